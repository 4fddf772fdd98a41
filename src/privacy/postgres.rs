//! The gate and masking on a PostgreSQL copy.
//!
//! Masking streams the masked columns out with `COPY … TO STDOUT (FORMAT binary)` on one
//! connection, masks each value with [`super::strategy::mask`] (the same function SQLite
//! calls), streams the results into a temporary table with `COPY … FROM STDIN` on a second
//! connection, and rewrites the table with one `UPDATE … FROM` joined on `ctid`, in one
//! transaction. Keeping the strategies in Rust rather than in SQL keeps one definition of each
//! and its guarantees (see `strategy`); the cost is the round trip of the masked columns only.

use async_trait::async_trait;
use futures_util::StreamExt as _;
use std::pin::pin;
use tokio_postgres::Client;
use tokio_postgres::binary_copy::{BinaryCopyInWriter, BinaryCopyOutStream};
use tokio_postgres::types::Type;

use super::{Column, Db, MaskKey, Strategy, ident};
use crate::privacy::strategy;

pub(super) struct Postgres {
    url: String,
    client: Client,
}

use crate::pg::{connect, error as pg_error};

/// `schema.table` as an SQL name; `public` tables are written without their schema.
fn qualified(table: &str) -> String {
    match table.split_once('.') {
        Some((schema, t)) => format!("{}.{}", ident(schema), ident(t)),
        None => format!("{}.{}", ident("public"), ident(table)),
    }
}

impl Postgres {
    pub(super) async fn connect(url: &str) -> Result<Postgres, String> {
        if url.is_empty() {
            return Err("the database has no url".into());
        }
        Ok(Postgres {
            url: url.to_string(),
            client: connect(url).await?,
        })
    }
}

#[async_trait]
impl Db for Postgres {
    async fn columns(&mut self) -> Result<Vec<Column>, String> {
        let rows = self
            .client
            .query(
                "SELECT n.nspname, c.relname, a.attname, format_type(a.atttypid, a.atttypmod),
                        a.attnotnull,
                        CASE WHEN t.typname IN ('varchar', 'bpchar') AND a.atttypmod > 4
                             THEN a.atttypmod - 4 END,
                        EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisunique
                                AND i.indnatts = 1 AND i.indkey[0] = a.attnum),
                        t.typname NOT IN ('bytea', 'bool')
                   FROM pg_attribute a
                   JOIN pg_class c ON c.oid = a.attrelid
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                   JOIN pg_type t ON t.oid = a.atttypid
                  WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
                    AND a.attnum > 0 AND NOT a.attisdropped
                    AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                    AND n.nspname NOT LIKE 'pg\\_%'
                  ORDER BY n.nspname, c.relname, a.attnum",
                &[],
            )
            .await
            .map_err(|e| format!("listing columns: {}", pg_error(&e)))?;
        Ok(rows
            .iter()
            .map(|r| {
                let schema: String = r.get(0);
                let table: String = r.get(1);
                Column {
                    table: if schema == "public" {
                        table
                    } else {
                        format!("{schema}.{table}")
                    },
                    name: r.get(2),
                    sql_type: r.get(3),
                    not_null: r.get(4),
                    max_len: r
                        .get::<_, Option<i32>>(5)
                        .and_then(|n| usize::try_from(n).ok()),
                    unique: r.get(6),
                    sampled: r.get(7),
                }
            })
            .collect())
    }

    async fn sample(
        &mut self,
        table: &str,
        cols: &[&Column],
        limit: usize,
    ) -> Result<Vec<Vec<Option<String>>>, String> {
        let list: Vec<String> = cols
            .iter()
            .map(|c| format!("{}::text", ident(&c.name)))
            .collect();
        let q = format!(
            "SELECT {} FROM {} LIMIT {limit}",
            list.join(", "),
            qualified(table)
        );
        let rows = self
            .client
            .query(&q, &[])
            .await
            .map_err(|e| format!("sampling {table}: {}", pg_error(&e)))?;
        Ok(rows
            .iter()
            .map(|r| {
                (0..cols.len())
                    .map(|i| r.get::<_, Option<String>>(i))
                    .collect()
            })
            .collect())
    }

    async fn mask(
        &mut self,
        table: &str,
        cols: &[(&Column, Strategy)],
        key: &MaskKey,
    ) -> Result<u64, String> {
        let e = |what: &'static str| {
            move |err: tokio_postgres::Error| format!("masking {table}: {what}: {}", pg_error(&err))
        };
        let tx = self.client.transaction().await.map_err(e("begin"))?;
        // The join of the masked values back onto the table hashes every row: let it in memory.
        tx.batch_execute("SET LOCAL work_mem = '256MB'")
            .await
            .map_err(e("work_mem"))?;
        let tmp_cols: Vec<String> = (0..cols.len()).map(|i| format!("c{i} text")).collect();
        tx.batch_execute(&format!(
            "CREATE TEMP TABLE dryrun_masked (tid text, {}) ON COMMIT DROP",
            tmp_cols.join(", ")
        ))
        .await
        .map_err(e("temporary table"))?;
        let types = vec![Type::TEXT; cols.len() + 1];
        let sink = tx
            .copy_in("COPY dryrun_masked FROM STDIN (FORMAT binary)")
            .await
            .map_err(e("copy in"))?;
        let mut writer = pin!(BinaryCopyInWriter::new(sink, &types));

        // A second connection reads the originals while the first writes the masked values.
        let reader = connect(&self.url).await?;
        let select: Vec<String> = cols
            .iter()
            .map(|(c, _)| format!("{}::text", ident(&c.name)))
            .collect();
        let out = reader
            .copy_out(&format!(
                "COPY (SELECT ctid::text, {} FROM {}) TO STDOUT (FORMAT binary)",
                select.join(", "),
                qualified(table)
            ))
            .await
            .map_err(e("copy out"))?;
        let mut rows = pin!(BinaryCopyOutStream::new(out, &types));
        let facts: Vec<_> = cols.iter().map(|(c, s)| (*s, c.facts())).collect();
        let mut values: Vec<Option<String>> = Vec::with_capacity(cols.len() + 1);
        while let Some(row) = rows.next().await {
            let row = row.map_err(e("reading"))?;
            values.clear();
            values.push(Some(row.get::<String>(0)));
            for (i, (s, f)) in facts.iter().enumerate() {
                values.push(strategy::mask(*s, row.get::<Option<&str>>(i + 1), key, *f));
            }
            writer
                .as_mut()
                .write_raw(values.iter())
                .await
                .map_err(e("writing"))?;
        }
        writer
            .as_mut()
            .finish()
            .await
            .map_err(e("finishing copy"))?;
        drop(reader);
        let sets: Vec<String> = cols
            .iter()
            .enumerate()
            .map(|(i, (c, _))| format!("{} = m.c{i}::{}", ident(&c.name), c.sql_type))
            .collect();
        let n = tx
            .execute(
                &format!(
                    "UPDATE {} AS t SET {} FROM dryrun_masked m WHERE t.ctid = m.tid::tid",
                    qualified(table),
                    sets.join(", ")
                ),
                &[],
            )
            .await
            .map_err(e("update"))?;
        tx.commit().await.map_err(e("commit"))?;
        Ok(n)
    }

    async fn count_originals(
        &mut self,
        table: &str,
        col: &Column,
        values: &[String],
    ) -> Result<u64, String> {
        let q = format!(
            "SELECT count(*) FROM {} WHERE {}::text = ANY($1)",
            qualified(table),
            ident(&col.name)
        );
        let n: i64 = self
            .client
            .query_one(&q, &[&values])
            .await
            .map_err(|e| format!("verifying {table}.{}: {}", col.name, pg_error(&e)))?
            .get(0);
        Ok(u64::try_from(n).unwrap_or(0))
    }
}
