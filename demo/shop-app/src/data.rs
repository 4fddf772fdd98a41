//! The shop's made-up history: customers, products and orders.
//!
//! The whole history, from the day the shop opened to [`HISTORY_END`], is generated
//! from the seed first; `--as-of` then keeps what existed at that moment. So a backup
//! taken earlier is exactly a prefix of a later one, as it would be in production.

use std::collections::HashSet;

use crate::prng::SplitMix64;

/// 2025-01-06T09:00:00Z: the shop opened.
pub const SHOP_OPENED: i64 = 1_736_154_000;
/// 2026-11-21T03:00:00Z: the generated history ends here (the newest demo backup).
pub const HISTORY_END: i64 = 1_795_230_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Customer {
    pub id: i64,
    pub email: String,
    pub name: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Product {
    pub id: i64,
    pub sku: String,
    pub name: String,
    pub price_cents: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub id: i64,
    pub customer_id: i64,
    pub product_id: i64,
    pub quantity: i64,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    pub customers: Vec<Customer>,
    pub products: Vec<Product>,
    pub orders: Vec<Order>,
}

impl Dataset {
    /// Customers whose e-mail address an earlier customer already has.
    pub fn duplicate_emails(&self) -> usize {
        let mut seen = HashSet::new();
        self.customers
            .iter()
            .filter(|c| !seen.insert(c.email.as_str()))
            .count()
    }

    /// What existed at `as_of` (inclusive). Ids stay dense because they were handed
    /// out in time order.
    pub fn cut_at(mut self, as_of: i64) -> Self {
        self.customers.retain(|c| c.created_at <= as_of);
        self.orders.retain(|o| o.created_at <= as_of);
        self
    }
}

const PRODUCTS: [(&str, i64); 40] = [
    ("Stoneware Coffee Mug", 1450),
    ("Enamel Camping Mug", 1290),
    ("Glass Teapot 1 l", 3400),
    ("Loose Leaf Green Tea 100 g", 890),
    ("Single-Origin Coffee Beans 250 g", 1190),
    ("Hand Grinder", 5900),
    ("Pour-Over Dripper", 2450),
    ("Paper Filters (100)", 490),
    ("Linen Tea Towel", 1200),
    ("Cotton Apron", 2800),
    ("Oak Cutting Board", 3900),
    ("Chef's Knife 20 cm", 8900),
    ("Cast Iron Skillet 26 cm", 4500),
    ("Wooden Spoon Set", 1600),
    ("Spice Jar Set (6)", 2200),
    ("Beeswax Food Wraps", 1500),
    ("Glass Storage Jar 1 l", 950),
    ("Recycled Notebook A5", 790),
    ("Fountain Pen", 3200),
    ("Ink Bottle, Blue-Black", 1100),
    ("Canvas Tote Bag", 1800),
    ("Wool Socks", 1400),
    ("Merino Beanie", 2900),
    ("Leather Card Holder", 3500),
    ("Desk Lamp", 6900),
    ("Soy Candle, Fig", 2100),
    ("Ceramic Plant Pot", 1900),
    ("Watering Can 1.5 l", 2600),
    ("Seed Kit: Herbs", 1250),
    ("Bamboo Toothbrush (4)", 990),
    ("Olive Oil Soap", 650),
    ("Shaving Brush", 2700),
    ("Picnic Blanket", 4900),
    ("Insulated Bottle 0.75 l", 2990),
    ("Lunch Box, Steel", 2400),
    ("Jigsaw Puzzle 1000", 2300),
    ("Wooden Chess Set", 5400),
    ("Playing Cards", 850),
    ("Gift Card 25", 2500),
    ("Gift Card 50", 5000),
];

const FIRST_NAMES: [&str; 48] = [
    "Anna", "Ben", "Chloé", "David", "Elif", "Farid", "Grace", "Hannah", "Ivan", "Jana", "Kenji",
    "Laura", "Mateo", "Nora", "Oliver", "Priya", "Quentin", "Rosa", "Samuel", "Tomás", "Uma",
    "Viktor", "Wen", "Ximena", "Yusuf", "Zoë", "Amir", "Bianca", "Carlos", "Dana", "Emma", "Felix",
    "Giulia", "Hugo", "Ines", "Jonas", "Kira", "Lucas", "Maja", "Noah", "Olga", "Paul", "Sofia",
    "Leon", "Mia", "Aisha", "Liam", "Sara",
];

const LAST_NAMES: [&str; 48] = [
    "Schmidt",
    "Müller",
    "García",
    "Rossi",
    "Novak",
    "Kowalski",
    "Nguyen",
    "Smith",
    "Jones",
    "O'Brien",
    "Dubois",
    "Jansen",
    "Andersson",
    "Nielsen",
    "Yılmaz",
    "Kim",
    "Tanaka",
    "Silva",
    "Costa",
    "Horvat",
    "Petrov",
    "Papadopoulos",
    "Murphy",
    "Brown",
    "Wilson",
    "Fischer",
    "Weber",
    "Meyer",
    "Wagner",
    "Becker",
    "Hoffmann",
    "Schulz",
    "Martin",
    "Bernard",
    "Lefèvre",
    "Moreau",
    "Fernández",
    "López",
    "Romano",
    "Bianchi",
    "Kovač",
    "Svoboda",
    "Lindqvist",
    "Haddad",
    "Chen",
    "Wang",
    "Patel",
    "Okafor",
];

const DOMAINS: [&str; 6] = [
    "example.com",
    "example.net",
    "example.org",
    "mail.example.com",
    "post.example.net",
    "inbox.example.org",
];

/// Lower-case ASCII for an e-mail local part: accents dropped, other marks removed.
fn email_part(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars().flat_map(char::to_lowercase) {
        let plain = match c {
            'á' | 'à' | 'â' | 'ä' | 'ã' | 'å' => 'a',
            'é' | 'è' | 'ê' | 'ë' => 'e',
            'í' | 'ì' | 'î' | 'ï' | 'ı' => 'i',
            'ó' | 'ò' | 'ô' | 'ö' | 'õ' | 'ø' => 'o',
            'ú' | 'ù' | 'û' | 'ü' => 'u',
            'ç' | 'č' => 'c',
            'ñ' => 'n',
            'š' => 's',
            'ž' => 'z',
            c if c.is_ascii_alphanumeric() => c,
            _ => continue,
        };
        out.push(plain);
    }
    out
}

/// The full history for `customers` customers (duplicates included) and `seed`.
pub fn generate(customers: u32, seed: u64) -> Dataset {
    let mut rng = SplitMix64::new(seed);
    let span = (HISTORY_END - SHOP_OPENED) as u64;

    let products = PRODUCTS
        .iter()
        .enumerate()
        .map(|(i, (name, price))| Product {
            id: i as i64 + 1,
            sku: format!("SKU-{}", 1001 + i),
            name: (*name).to_owned(),
            price_cents: *price,
        })
        .collect::<Vec<_>>();

    // Sign-up times: the later of two uniform draws, so that the shop grows (sign-ups
    // per day rise linearly over the history). Sorted, so ids follow time.
    let mut signups: Vec<i64> = (0..customers)
        .map(|_| SHOP_OPENED + rng.below(span).max(rng.below(span)) as i64)
        .collect();
    signups.sort_unstable();

    let mut used_emails = HashSet::new();
    let mut people: Vec<Customer> = Vec::with_capacity(signups.len());
    for (i, created_at) in signups.into_iter().enumerate() {
        let id = i as i64 + 1;
        // About 1 % of sign-ups are people who registered a second time with the same
        // address and name: exact duplicates, as real data has.
        if !people.is_empty() && rng.chance_per_mille(10) {
            let original = &people[rng.below(people.len() as u64) as usize];
            let (email, name) = (original.email.clone(), original.name.clone());
            people.push(Customer {
                id,
                email,
                name,
                created_at,
            });
            continue;
        }
        let first = *rng.pick(&FIRST_NAMES);
        let last = *rng.pick(&LAST_NAMES);
        let (f, l) = (email_part(first), email_part(last));
        let local = match rng.below(6) {
            0 | 1 => format!("{f}.{l}"),
            2 => format!("{f}{l}"),
            3 => format!("{}.{l}", &f[..1]),
            4 => format!("{f}_{l}"),
            _ => format!("{l}.{f}"),
        };
        let domain = *rng.pick(&DOMAINS);
        let mut email = format!("{local}@{domain}");
        while !used_emails.insert(email.clone()) {
            email = format!("{local}{}@{domain}", rng.range(2, 99));
        }
        people.push(Customer {
            id,
            email,
            name: format!("{first} {last}"),
            created_at,
        });
    }

    // Orders: most customers order soon after signing up, some come back.
    // Number of orders per customer:  0    1    2    3    4    5   6..12
    const ORDER_COUNT_WEIGHTS: [u64; 7] = [20, 28, 20, 14, 9, 5, 4];
    // Quantity:                        1   2   3  4..6
    const QUANTITY_WEIGHTS: [u64; 4] = [75, 17, 6, 2];
    let mut orders = Vec::new();
    for customer in &people {
        let n = match rng.weighted(&ORDER_COUNT_WEIGHTS) {
            6 => rng.range(6, 12),
            k => k as u64,
        };
        let remaining = (HISTORY_END - customer.created_at) as u64;
        for k in 0..n {
            let after = if k == 0 {
                // First order within three days of signing up.
                rng.below(remaining.min(3 * 86_400) + 1)
            } else {
                rng.below(remaining + 1)
            };
            // Popular products first: the smaller of two draws.
            let product = rng
                .below(products.len() as u64)
                .min(rng.below(products.len() as u64));
            let quantity = match rng.weighted(&QUANTITY_WEIGHTS) {
                3 => rng.range(4, 6),
                q => q as u64 + 1,
            };
            orders.push(Order {
                id: 0,
                customer_id: customer.id,
                product_id: product as i64 + 1,
                quantity: quantity as i64,
                created_at: customer.created_at + after as i64,
            });
        }
    }
    // Stable sort: ties keep generation order, so the result is deterministic.
    orders.sort_by_key(|o| o.created_at);
    for (i, order) in orders.iter_mut().enumerate() {
        order.id = i as i64 + 1;
    }

    Dataset {
        customers: people,
        products,
        orders,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{format_rfc3339, parse_rfc3339};

    #[test]
    fn constants_are_the_documented_dates() {
        assert_eq!(format_rfc3339(SHOP_OPENED), "2025-01-06T09:00:00Z");
        assert_eq!(format_rfc3339(HISTORY_END), "2026-11-21T03:00:00Z");
    }

    #[test]
    fn deterministic_for_a_seed() {
        assert_eq!(generate(500, 1), generate(500, 1));
        assert_ne!(generate(500, 1), generate(500, 2));
    }

    #[test]
    fn realistic_shape() {
        let data = generate(3000, 42);
        assert_eq!(data.customers.len(), 3000);
        assert_eq!(data.products.len(), 40);
        let dups = data.duplicate_emails();
        assert!(
            (10..=60).contains(&dups),
            "about 1 % duplicates, got {dups}"
        );
        assert!(
            data.orders.len() > 4000,
            "several thousand orders, got {}",
            data.orders.len()
        );
        for o in &data.orders {
            let c = &data.customers[(o.customer_id - 1) as usize];
            assert!(o.created_at >= c.created_at && o.created_at <= HISTORY_END);
        }
    }

    #[test]
    fn an_earlier_cut_is_a_prefix() {
        let full = generate(3000, 42);
        let day_before = full
            .clone()
            .cut_at(parse_rfc3339("2026-11-20T03:00:00Z").unwrap());
        assert!(day_before.customers.len() < full.customers.len());
        assert!(day_before.orders.len() < full.orders.len());
        assert_eq!(
            day_before.customers[..],
            full.customers[..day_before.customers.len()]
        );
        assert_eq!(
            day_before.orders[..],
            full.orders[..day_before.orders.len()]
        );
    }
}
