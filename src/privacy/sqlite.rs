//! The gate and masking on a SQLite copy: one connection, masking as an SQL function
//! (`dryrun_mask`) that calls [`super::strategy::mask`], `secure_delete` on so that the pages the
//! originals were on are zeroed, then `VACUUM` (an UPDATE that moves cells between pages leaves
//! old bytes in free space) and the WAL checkpointed away.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::functions::FunctionFlags;
use rusqlite::types::ValueRef;

use super::{Column, Db, MaskKey, Strategy, ident};
use crate::privacy::strategy::{self, ColumnFacts};

pub(super) struct Sqlite {
    conn: Arc<Mutex<rusqlite::Connection>>,
}

impl Sqlite {
    pub(super) fn open(path: &str) -> Result<Sqlite, String> {
        if path.is_empty() {
            return Err("the database has no path".into());
        }
        let conn = rusqlite::Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| format!("open: {e}"))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        Ok(Sqlite {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut rusqlite::Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    ) -> Result<T, String> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = conn
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            f(&mut c).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

fn text(v: ValueRef<'_>) -> Option<String> {
    match v {
        ValueRef::Null | ValueRef::Blob(_) => None,
        ValueRef::Integer(i) => Some(i.to_string()),
        ValueRef::Real(f) => Some(f.to_string()),
        ValueRef::Text(t) => Some(String::from_utf8_lossy(t).into_owned()),
    }
}

#[async_trait]
impl Db for Sqlite {
    async fn columns(&mut self) -> Result<Vec<Column>, String> {
        self.with(|c| {
            let tables: Vec<String> = c
                .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")?
                .query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            let mut out = Vec::new();
            for t in tables {
                let mut unique = Vec::new();
                let indexes: Vec<(String, bool)> = c
                    .prepare(&format!("PRAGMA index_list({})", ident(&t)))?
                    .query_map([], |r| Ok((r.get::<_, String>(1)?, r.get::<_, i64>(2)? == 1)))?
                    .collect::<Result<_, _>>()?;
                for (name, is_unique) in indexes {
                    if !is_unique {
                        continue;
                    }
                    let cols: Vec<Option<String>> = c
                        .prepare(&format!("PRAGMA index_info({})", ident(&name)))?
                        .query_map([], |r| r.get(2))?
                        .collect::<Result<_, _>>()?;
                    if let [Some(only)] = cols.as_slice() {
                        unique.push(only.clone());
                    }
                }
                let cols: Vec<(String, String, bool, i64)> = c
                    .prepare(&format!("PRAGMA table_info({})", ident(&t)))?
                    .query_map([], |r| Ok((r.get(1)?, r.get(2)?, r.get::<_, i64>(3)? == 1, r.get(5)?)))?
                    .collect::<Result<_, _>>()?;
                let single_pk = cols.iter().filter(|c| c.3 > 0).count() == 1;
                for (name, ty, not_null, pk) in cols {
                    let lower = ty.to_ascii_lowercase();
                    out.push(Column {
                        table: t.clone(),
                        unique: unique.contains(&name) || (pk > 0 && single_pk),
                        sampled: !lower.contains("blob") && !lower.contains("bool"),
                        name,
                        sql_type: ty,
                        not_null: not_null || pk > 0,
                        max_len: None,
                    });
                }
            }
            Ok(out)
        })
        .await
    }

    async fn sample(
        &mut self,
        table: &str,
        cols: &[&Column],
        limit: usize,
    ) -> Result<Vec<Vec<Option<String>>>, String> {
        let list: Vec<String> = cols.iter().map(|c| ident(&c.name)).collect();
        let q = format!(
            "SELECT {} FROM {} LIMIT {limit}",
            list.join(", "),
            ident(table)
        );
        let n = cols.len();
        self.with(move |c| {
            let mut st = c.prepare(&q)?;
            let rows = st
                .query_map([], |r| {
                    (0..n)
                        .map(|i| Ok(text(r.get_ref(i)?)))
                        .collect::<Result<Vec<_>, _>>()
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
    }

    async fn mask(
        &mut self,
        table: &str,
        cols: &[(&Column, Strategy)],
        key: &MaskKey,
    ) -> Result<u64, String> {
        let sets: Vec<String> = cols
            .iter()
            .map(|(c, s)| {
                format!(
                    "{} = dryrun_mask({}, {}, {})",
                    ident(&c.name),
                    *s as u8,
                    ident(&c.name),
                    u8::from(c.unique)
                )
            })
            .collect();
        let q = format!("UPDATE {} SET {}", ident(table), sets.join(", "));
        let key = key.clone();
        self.with(move |c| {
            c.create_scalar_function(
                "dryrun_mask",
                3,
                FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC,
                move |ctx| {
                    let s = ctx.get::<i64>(0)?;
                    let strategy = Strategy::NAMES
                        .get(usize::try_from(s).unwrap_or(usize::MAX))
                        .and_then(|n| Strategy::parse(n))
                        .ok_or_else(|| rusqlite::Error::UserFunctionError("bad strategy".into()))?;
                    let value = text(ctx.get_raw(1));
                    let facts = ColumnFacts {
                        unique: ctx.get::<i64>(2)? == 1,
                        max_len: None,
                    };
                    Ok(strategy::mask(strategy, value.as_deref(), &key, facts))
                },
            )?;
            // Freed pages and cells are zeroed, so the originals do not linger in the file.
            c.pragma_update(None, "secure_delete", "ON")?;
            let tx = c.transaction()?;
            let n = tx.execute(&q, [])?;
            tx.commit()?;
            // secure_delete zeroes the cells it deletes, but an UPDATE that rebalances a page
            // leaves the old cell bytes in the page's free space: rebuild the file so that no
            // original survives anywhere in it (a release can read the file's raw bytes).
            c.execute_batch("VACUUM")?;
            c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
            c.remove_function("dryrun_mask", 3)?;
            Ok(n as u64)
        })
        .await
    }

    async fn count_originals(
        &mut self,
        table: &str,
        col: &Column,
        values: &[String],
    ) -> Result<u64, String> {
        let q = format!(
            "SELECT count(*) FROM {} WHERE CAST({} AS TEXT) IN (SELECT value FROM json_each(?1))",
            ident(table),
            ident(&col.name)
        );
        let json = serde_json::to_string(values).map_err(|e| e.to_string())?;
        self.with(move |c| {
            let n: i64 = c.query_row(&q, [json], |r| r.get(0))?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
        .await
    }
}
