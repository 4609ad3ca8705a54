//! `ringkv-bench flamegraph`: turns `perf script` output into a flame graph
//! (SVG) and a markdown table of where the time went: the share of samples
//! per thread name (perf's comm, the flame graph's root frames) and the
//! functions with the most self time (samples whose innermost frame is that
//! function).
//!
//! Stacks are collapsed and drawn by the `inferno` crate. Kernel frames are
//! marked `_[k]` by its collapser, so the table can tell the kernel's share
//! apart. Samples of the idle task (`swapper`) are counted as idle and left
//! out of the function ranking: with `perf record -C` on a part-idle core
//! they would push the server's own functions off the list.

use anyhow::{bail, Context, Result};
use inferno::collapse::perf::{Folder, Options as CollapseOptions};
use inferno::collapse::Collapse;
use inferno::flamegraph::{self, color::MultiPalette, Palette};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::BufReader;
use std::path::Path;

/// The suffix inferno's perf collapser gives kernel frames.
const KERNEL_MARK: &str = "_[k]";
/// The idle task's name in perf's output.
const IDLE_COMM: &str = "swapper";

/// What the samples of a profile add up to. Counts are weighted as inferno
/// folds them: by each sample's period (nanoseconds for perf's cpu-clock
/// event, cycles for the cycles event), so shares are shares of time.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Profile {
    pub samples: u64,
    /// Samples per thread name (perf's comm, the root frame).
    pub per_comm: BTreeMap<String, u64>,
    /// Self samples per function (innermost frame), idle task excluded.
    pub self_samples: BTreeMap<String, u64>,
    /// Samples whose innermost frame is in the kernel, idle task excluded.
    pub kernel_samples: u64,
}

impl Profile {
    /// Adds up folded stacks: `comm;outer;...;inner COUNT` per line.
    pub fn of_folded(folded: &str) -> Profile {
        let mut p = Profile::default();
        for line in folded.lines() {
            let Some((stack, count)) = line.rsplit_once(' ') else { continue };
            let Ok(count) = count.trim().parse::<u64>() else { continue };
            let comm = stack.split(';').next().unwrap_or_default();
            let leaf = stack.rsplit(';').next().unwrap_or_default();
            p.samples += count;
            *p.per_comm.entry(comm.to_string()).or_default() += count;
            if comm.starts_with(IDLE_COMM) {
                continue;
            }
            if leaf.ends_with(KERNEL_MARK) {
                p.kernel_samples += count;
            }
            *p.self_samples.entry(leaf.to_string()).or_default() += count;
        }
        p
    }

    fn idle_samples(&self) -> u64 {
        self.per_comm.iter().filter(|(c, _)| c.starts_with(IDLE_COMM)).map(|(_, n)| n).sum()
    }

    /// The markdown report: thread names, then the `top` functions by self
    /// time.
    pub fn markdown(&self, title: &str, top: usize) -> String {
        let mut s = String::new();
        let pct = |n: u64, of: u64| if of == 0 { 0.0 } else { 100.0 * n as f64 / of as f64 };
        let busy = self.samples - self.idle_samples();
        let _ = writeln!(s, "# {title}\n");
        let _ = writeln!(
            s,
            "{} samples (weighted by period); {:.1}% idle; of the busy time {:.1}% in the kernel, {:.1}% in user \
             space.\n",
            self.samples,
            pct(self.idle_samples(), self.samples),
            pct(self.kernel_samples, busy),
            pct(busy - self.kernel_samples, busy)
        );
        let _ = writeln!(s, "| thread (comm) | weight | share |\n|---|---:|---:|");
        let mut comms: Vec<(&String, &u64)> = self.per_comm.iter().collect();
        comms.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (comm, n) in comms {
            let _ = writeln!(s, "| {} | {n} | {:.1}% |", cell(comm), pct(*n, self.samples));
        }
        let _ = writeln!(
            s,
            "\nTop {top} functions by self time (idle task excluded; share of the busy time):\n\n\
             | # | self % | weight | function | where |\n|---:|---:|---:|---|---|"
        );
        let mut funcs: Vec<(&String, &u64)> = self.self_samples.iter().collect();
        funcs.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (i, (f, n)) in funcs.into_iter().take(top).enumerate() {
            let (name, place) = match f.strip_suffix(KERNEL_MARK) {
                Some(k) => (k, "kernel"),
                None => (f.as_str(), "user"),
            };
            let _ = writeln!(s, "| {} | {:.1}% | {n} | {} | {place} |", i + 1, pct(*n, busy), cell(name));
        }
        s
    }
}

/// A table cell: pipes would end it, backticks would open code.
fn cell(text: &str) -> String {
    format!("`{}`", text.replace('|', "\\|").replace('`', "'"))
}

/// Folds `perf script` output into `comm;frames... count` lines.
pub fn collapse(perf_script: &Path) -> Result<String> {
    let file = std::fs::File::open(perf_script).with_context(|| format!("opening {}", perf_script.display()))?;
    let mut opts = CollapseOptions::default();
    opts.annotate_kernel = true;
    opts.annotate_jit = true;
    let mut folded = Vec::new();
    Folder::from(opts)
        .collapse(BufReader::new(file), &mut folded)
        .with_context(|| format!("collapsing {}", perf_script.display()))?;
    String::from_utf8(folded).context("folded stacks are not UTF-8")
}

/// Draws `folded` stacks as a flame graph SVG.
pub fn draw(folded: &str, title: &str, svg: &Path) -> Result<()> {
    let mut opts = flamegraph::Options::default();
    opts.title = title.to_string();
    opts.colors = Palette::Multi(MultiPalette::Rust);
    // Colours by name, so the same function has the same colour in the
    // flame graphs of two runs.
    opts.hash = true;
    opts.deterministic = true;
    opts.count_name = "samples".into();
    let out = std::fs::File::create(svg).with_context(|| format!("creating {}", svg.display()))?;
    flamegraph::from_lines(&mut opts, folded.lines(), std::io::BufWriter::new(out))
        .with_context(|| format!("drawing {}", svg.display()))
}

/// The whole command: collapse, draw, tabulate. Returns the profile.
pub fn run(perf_script: &Path, svg: &Path, top_md: Option<&Path>, title: &str, top: usize) -> Result<Profile> {
    let folded = collapse(perf_script)?;
    let profile = Profile::of_folded(&folded);
    if profile.samples == 0 {
        bail!("{} holds no samples with stacks (was perf record run with -g?)", perf_script.display());
    }
    draw(&folded, title, svg)?;
    if let Some(md) = top_md {
        std::fs::write(md, profile.markdown(title, top)).with_context(|| format!("writing {}", md.display()))?;
    }
    Ok(profile)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two samples in `perf script` format: one of a server thread in the
    /// kernel under a user function, one of the idle task.
    const SCRIPT: &str = "\
ringkv 1234/1240 [001] 100.000001:     250000 cpu-clock:pppH: 
\tffffffff81000001 tcp_sendmsg+0x1 ([kernel.kallsyms])
\tffffffff81000002 __sys_sendto+0x2 ([kernel.kallsyms])
\t    55555555a000 ringkv_engine::conn::serve+0x10 (/usr/bin/ringkv)
\t    55555555b000 main+0x20 (/usr/bin/ringkv)

ringkv 1234/1240 [001] 100.000002:     250000 cpu-clock:pppH: 
\t    55555555c000 ringkv_engine::store::read+0x10 (/usr/bin/ringkv)
\t    55555555b000 main+0x20 (/usr/bin/ringkv)

swapper     0/0     [001] 100.000003:     250000 cpu-clock:pppH: 
\tffffffff81000003 default_idle+0x3 ([kernel.kallsyms])
\tffffffff81000004 do_idle+0x4 ([kernel.kallsyms])

";

    #[test]
    fn perf_script_becomes_a_flame_graph_and_a_table() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("perf.script");
        std::fs::write(&script, SCRIPT).unwrap();
        let (svg, md) = (dir.path().join("flame.svg"), dir.path().join("top.md"));
        let p = run(&script, &svg, Some(&md), "test profile", 30).unwrap();
        // Weighted by each sample's period (here 250 us of cpu-clock).
        assert_eq!(p.samples, 750_000);
        assert_eq!(p.per_comm.get("ringkv"), Some(&500_000));
        assert_eq!(p.kernel_samples, 250_000);
        assert_eq!(p.self_samples.get("tcp_sendmsg_[k]"), Some(&250_000), "{p:?}");
        assert!(!p.self_samples.keys().any(|k| k.contains("idle")), "the idle task is not ranked: {p:?}");
        let svg = std::fs::read_to_string(&svg).unwrap();
        assert!(svg.contains("<svg") && svg.contains("tcp_sendmsg") && svg.contains("test profile"));
        let md = std::fs::read_to_string(&md).unwrap();
        assert!(md.contains("33.3% idle") && md.contains("50.0% in the kernel"), "{md}");
        assert!(md.contains("| `tcp_sendmsg` | kernel |"), "{md}");
        assert!(md.contains("`ringkv_engine::store::read` | user |"), "{md}");

        std::fs::write(&script, "").unwrap();
        assert!(run(&script, &svg_path(&dir), None, "empty", 30).is_err());
    }

    fn svg_path(dir: &tempfile::TempDir) -> std::path::PathBuf {
        dir.path().join("empty.svg")
    }

    #[test]
    fn folded_lines_add_up() {
        let p = Profile::of_folded("a;f;g 3\na;f 2\nswapper;idle_[k] 5\nb;h_[k] 1\nnot a line\n");
        assert_eq!(p.samples, 11);
        assert_eq!(p.self_samples.get("g"), Some(&3));
        assert_eq!(p.self_samples.get("f"), Some(&2));
        assert_eq!(p.kernel_samples, 1);
        let md = p.markdown("t", 2);
        assert!(md.contains("| 1 | 50.0% | 3 | `g` | user |"), "{md}");
        assert!(!md.contains("`h`"), "only the top 2: {md}");
    }
}
