//! `ringkv leave|remove|weight|plan|commit|cancel`: ring changes, staged on
//! the node named by `--endpoint`, shown with what they would move, then
//! committed (docs/ELASTICITY.md). The node plans and checks every change;
//! this module only asks and renders.

use crate::cli::{Endpoint, RingArgs, StageArgs, WeightArgs};
use crate::client_cmd::connect;
use crate::Failure;
use ringkv_net::proto::{NodeInfo, Reply, Request, RingAction, RingChange};
use std::io::Write;
use std::time::{Duration, Instant};

fn ask(e: &Endpoint, action: RingAction, change: Option<RingChange>) -> Result<String, Failure> {
    let mut c = connect(e)?;
    match c.call(Request::RingChange { action, change })? {
        Reply::RingChange { plan } => Ok(plan),
        other => Err(Failure::Unreachable(format!("unexpected reply {other:?}"))),
    }
}

fn show(plan: &str, json: bool, heading: &str) {
    if json {
        println!("{plan}");
        return;
    }
    match serde_json::from_str::<serde_json::Value>(plan) {
        Ok(v) => print!("{heading}\n{}", render(&v)),
        Err(_) => println!("{plan}"),
    }
}

/// `ringkv leave`: stages the decommission of the node at `--endpoint`.
pub fn leave(a: &StageArgs) -> Result<(), Failure> {
    let me = connect(&a.endpoint)?.node_info()?.node_id;
    stage(a, RingChange::Leave { member: me })
}

pub fn remove(a: &StageArgs, id: &str) -> Result<(), Failure> {
    stage(a, RingChange::Remove { member: id.to_string() })
}

pub fn weight(a: &WeightArgs) -> Result<(), Failure> {
    stage(&a.stage, RingChange::Weight { member: a.id.clone(), weight: a.weight })
}

fn stage(a: &StageArgs, change: RingChange) -> Result<(), Failure> {
    let plan = ask(&a.endpoint, RingAction::Stage, Some(change))?;
    show(&plan, a.json, "staged (nothing changes until `ringkv commit`):");
    Ok(())
}

pub fn plan(a: &RingArgs) -> Result<(), Failure> {
    let plan = ask(&a.endpoint, RingAction::Show, None)?;
    if plan.is_empty() {
        if a.json {
            println!("null");
        } else {
            println!("no ring change is staged on {}", a.endpoint.endpoint);
        }
        return Ok(());
    }
    show(&plan, a.json, "staged:");
    Ok(())
}

pub fn cancel(a: &RingArgs) -> Result<(), Failure> {
    ask(&a.endpoint, RingAction::Cancel, None)?;
    println!("cancelled");
    Ok(())
}

pub fn commit(a: &RingArgs) -> Result<(), Failure> {
    let plan = ask(&a.endpoint, RingAction::Commit, None)?;
    show(&plan, a.json, "committed:");
    if a.wait {
        wait(&a.endpoint, Duration::from_secs(a.wait_s))?;
    }
    Ok(())
}

/// How far the cluster is from done: partitions still moving, and their
/// estimated bytes, over every member that is up.
fn moving(n: &NodeInfo) -> (u64, u64) {
    let up = n.members.iter().filter(|m| m.alive);
    up.fold((0, 0), |(p, b), m| (p + u64::from(m.moving_partitions), b + m.moving_bytes))
}

/// The cluster as the first member that answers sees it: the node asked
/// may be the one that leaves, and stop.
pub fn any_info(endpoints: &mut Vec<Endpoint>) -> Result<NodeInfo, Failure> {
    let mut last = None;
    for (i, e) in endpoints.iter().enumerate() {
        match connect(e).and_then(|mut c| c.node_info().map_err(Failure::from)) {
            Ok(n) => {
                let known = endpoints.clone();
                // Remember every member, so a later round has somewhere to go.
                let mut next: Vec<Endpoint> = vec![known[i].clone()];
                for m in n.members.iter().filter(|m| m.alive) {
                    if !next.iter().any(|x| x.endpoint == m.addr) {
                        next.push(Endpoint { endpoint: m.addr.clone(), ..known[i].clone() });
                    }
                }
                *endpoints = next;
                return Ok(n);
            }
            Err(f) => last = Some(f),
        }
    }
    Err(last.unwrap_or_else(|| Failure::Unreachable("no member to ask".into())))
}

/// Waits until no member streams and no live member is still leaving,
/// drawing progress.
fn wait(e: &Endpoint, limit: Duration) -> Result<(), Failure> {
    let start = Instant::now();
    let mut most = 0u64;
    let mut endpoints = vec![e.clone()];
    // Give the claimant a gossip round or two to claim the new ring.
    std::thread::sleep(Duration::from_secs(2));
    let mut quiet = 0;
    loop {
        let n = any_info(&mut endpoints)?;
        let (parts, bytes) = moving(&n);
        let leaving = n.members.iter().any(|m| m.status == "leaving" && m.alive);
        most = most.max(parts);
        let done = most - parts.min(most);
        let width = 30usize;
        let filled = if most == 0 { width } else { (done as usize * width) / most as usize };
        eprint!(
            "\r[{}{}] {done}/{most} partitions moved, {} left{}   ",
            "#".repeat(filled),
            "-".repeat(width - filled),
            human(bytes),
            if leaving { ", a member is still leaving" } else { "" }
        );
        let _ = std::io::stderr().flush();
        // Figures are gossiped every few seconds: quiet twice in a row.
        quiet = if parts == 0 && !leaving { quiet + 1 } else { 0 };
        if quiet >= 2 {
            eprintln!();
            println!("done in {:.1} s", start.elapsed().as_secs_f64());
            return Ok(());
        }
        if start.elapsed() > limit {
            eprintln!();
            return Err(Failure::Unreachable(format!(
                "still moving after {} s: {parts} partitions, {} (see `ringkv status`)",
                limit.as_secs(),
                human(bytes)
            )));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

/// The plan, for people: the change, bytes per node, time, warnings.
fn render(v: &serde_json::Value) -> String {
    let p = &v["plan"];
    let change = &p["change"];
    let what = match change["kind"].as_str().unwrap_or("?") {
        "weight" => format!("weight {} {}", change["member"].as_str().unwrap_or("?"), change["weight"]),
        k => format!("{k} {}", change["member"].as_str().unwrap_or("?")),
    };
    let mut s = format!("  change      {what} (staged on {})\n", v["staged_on"].as_str().unwrap_or("?"));
    let moves = p["moves"].as_array().map_or(0, Vec::len);
    let bytes = p["bytes"].as_u64().unwrap_or(0);
    s += &format!("  moves       {moves} partition replicas, about {}\n", human(bytes));
    s += &format!("  estimate    {:.1} s at the configured stream rate\n", p["estimate_s"].as_f64().unwrap_or(0.0));
    let per = |k: &str| -> Vec<(String, u64)> {
        p[k].as_object().map_or(Vec::new(), |m| m.iter().map(|(n, b)| (n.clone(), b.as_u64().unwrap_or(0))).collect())
    };
    for (n, b) in per("sends") {
        s += &format!("  {n:<12}sends {}\n", human(b));
    }
    for (n, b) in per("receives") {
        s += &format!("  {n:<12}receives {}\n", human(b));
    }
    if let Some(owned) = p["owned_after"].as_object() {
        let list: Vec<String> = owned.iter().map(|(n, c)| format!("{n} {c}")).collect();
        s += &format!("  owns after  {}\n", list.join(", "));
    }
    for w in p["warnings"].as_array().into_iter().flatten() {
        s += &format!("  warning     {}\n", w.as_str().unwrap_or(""));
    }
    s
}
