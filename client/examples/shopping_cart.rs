//! A shopping cart that survives concurrent edits: two devices change the
//! same cart without seeing each other's change, ringkv keeps both as
//! siblings, and the cart's merge (a `Resolve`) folds them into one cart
//! that has both changes. The merge is state-based: quantities merge by
//! maximum, removals are remembered (a removed item stays removed), so it
//! is commutative, associative and idempotent, which `check` verifies
//! before anything is written.
//!
//! With a cluster running (`cargo run --release --bin ringkv -- cluster up`):
//!
//! ```sh
//! cargo run -p ringkv-client --example shopping_cart -- 127.0.0.1:7070
//! ```

use ringkv_client::{check, Client, Resolve, Value, WriteOptions};
use std::collections::{BTreeMap, BTreeSet};

/// What the cart holds: each item's quantity, and the items removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cart {
    /// Item name -> quantity.
    pub items: BTreeMap<String, u32>,
    /// Items taken out; they stay out whatever a sibling says.
    pub removed: BTreeSet<String>,
}

impl Cart {
    /// Sets an item's quantity (raising it: see the merge).
    pub fn add(&mut self, item: &str, quantity: u32) {
        let q = self.items.entry(item.to_string()).or_default();
        *q = (*q).max(quantity);
    }

    /// Takes an item out for good.
    pub fn remove(&mut self, item: &str) {
        self.removed.insert(item.to_string());
    }

    /// What the customer sees.
    pub fn visible(&self) -> Vec<(&str, u32)> {
        self.items.iter().filter(|(i, _)| !self.removed.contains(*i)).map(|(i, q)| (i.as_str(), *q)).collect()
    }
}

/// Stored as lines: `+item quantity` or `-item`.
impl Value for Cart {
    fn encode(&self) -> Vec<u8> {
        let mut out = String::new();
        for (item, q) in &self.items {
            out.push_str(&format!("+{item} {q}\n"));
        }
        for item in &self.removed {
            out.push_str(&format!("-{item}\n"));
        }
        out.into_bytes()
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(bytes).map_err(|e| e.to_string())?;
        let mut cart = Cart::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix('+') {
                let (item, q) = rest.rsplit_once(' ').ok_or_else(|| format!("bad line {line:?}"))?;
                cart.add(item, q.parse().map_err(|_| format!("bad quantity in {line:?}"))?);
            } else if let Some(item) = line.strip_prefix('-') {
                cart.remove(item);
            } else {
                return Err(format!("bad line {line:?}"));
            }
        }
        Ok(cart)
    }
}

/// Merges two carts edited concurrently.
pub struct MergeCarts;

impl Resolve<Cart> for MergeCarts {
    fn merge(&self, a: &Cart, b: &Cart) -> Cart {
        let mut out = a.clone();
        for (item, q) in &b.items {
            out.add(item, *q);
        }
        out.removed.extend(b.removed.iter().cloned());
        out
    }
}

/// A few carts to check the merge's laws on.
pub fn sample_carts() -> Vec<Cart> {
    let mut apples = Cart::default();
    apples.add("apples", 2);
    let mut more_apples = apples.clone();
    more_apples.add("apples", 5);
    let mut pears_no_apples = Cart::default();
    pears_no_apples.add("pears", 1);
    pears_no_apples.remove("apples");
    vec![Cart::default(), apples, more_apples, pears_no_apples]
}

#[allow(dead_code)]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A merge that breaks a law would make replicas disagree: refuse to
    // start with one.
    check::merge_laws_hold(&MergeCarts, &sample_carts())?;

    let seed = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:7070".into());
    let mut client = Client::builder().seed(seed).build()?;
    let key = format!("cart:{}", std::process::id());

    // The phone and the laptop both start from the empty cart.
    let start = client.get(&key)?;
    let mut phone = Cart::default();
    phone.add("apples", 3);
    phone.add("milk", 1);
    let mut laptop = Cart::default();
    laptop.add("pears", 2);
    laptop.remove("milk");
    // Both write with the context they read: neither saw the other's write,
    // so the node keeps both as siblings.
    let ctx = WriteOptions::with_context(start.context().clone());
    client.put(&key, phone.encode(), &ctx)?;
    client.put(&key, laptop.encode(), &ctx)?;
    println!("siblings after the concurrent edits: {}", client.get(&key)?.len());

    // Checkout reads the cart: the siblings merge, the merge is written back.
    let cart: Cart = client.get_resolved(&key, &MergeCarts)?.unwrap_or_default();
    println!("cart: {:?}", cart.visible());
    println!("siblings now: {}", client.get(&key)?.len());

    // A later change is a read-resolve-modify-write.
    let cart = client.update(&key, &MergeCarts, |cart| {
        let mut cart = cart.unwrap_or_default();
        cart.add("figs", 1);
        cart
    })?;
    println!("after adding figs: {:?}", cart.visible());
    let last = client.get(&key)?;
    client.delete(&key, &WriteOptions::with_context(last.context().clone()))?;
    Ok(())
}
