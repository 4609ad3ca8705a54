//! The node's data directory: exclusive lock, identity file, shard folders.
//!
//! `ringkv.meta` records what the directory was created for (node id,
//! cluster, partitions, shards) and its incarnation, a random number drawn at
//! creation: a node that loses its directory comes back as a new incarnation,
//! so its fresh history can never be mistaken for the old one.
//!
//! All checks here run before any shard starts, so a bad directory stops
//! start-up with one clear line.

use crate::config::NodeConfig;
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

const META: &str = "ringkv.meta";
const LOCK: &str = "LOCK";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Meta {
    pub format: u32,
    pub node_id: String,
    pub cluster: String,
    pub partitions: u32,
    pub shards: usize,
    /// Hex, so the TOML stays readable and exact.
    pub incarnation: String,
    pub created_ms: u64,
}

impl Meta {
    pub fn incarnation(&self) -> u64 {
        u64::from_str_radix(&self.incarnation, 16).expect("validated on load")
    }
}

/// An opened, locked data directory. The lock is held until this is dropped.
pub struct DataDir {
    pub root: PathBuf,
    pub meta: Meta,
    _lock: File,
}

impl DataDir {
    pub fn shard_dir(&self, shard: usize) -> PathBuf {
        self.root.join(format!("shard-{shard:03}"))
    }
}

/// Opens (creating if needed) and locks the directory named by `cfg`, and
/// checks it belongs to this node, cluster and shard layout.
pub fn open(cfg: &NodeConfig) -> Result<DataDir, String> {
    let root = cfg.data_dir.clone();
    let shown = root.display().to_string();
    fs::create_dir_all(&root).map_err(|e| format!("cannot create data directory {shown}: {e}"))?;
    probe_writable(&root).map_err(|e| format!("data directory {shown} is not writable: {e}"))?;
    let lock = lock(&root).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock => format!("data directory {shown} is in use by another ringkv server"),
        _ => format!("cannot lock data directory {shown}: {e}"),
    })?;
    let meta_path = root.join(META);
    let meta = match fs::read_to_string(&meta_path) {
        Ok(text) => {
            let meta: Meta = toml::from_str(&text).map_err(|e| format!("{}: {}", meta_path.display(), e.message()))?;
            check(&meta, cfg, &shown)?;
            meta
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if has_shard_dirs(&root) {
                return Err(format!(
                    "data directory {shown} holds shard data but no {META}; refusing to guess its identity"
                ));
            }
            let meta = Meta {
                format: 1,
                node_id: cfg.node_id.clone().unwrap_or_else(|| cfg.listen.to_string()),
                cluster: cfg.cluster.clone(),
                partitions: cfg.partitions,
                shards: cfg.shard_count(),
                incarnation: format!("{:016x}", rand::random::<u64>() | 1),
                created_ms: crate::clock::now_ms(),
            };
            write_meta(&root, &meta).map_err(|e| format!("cannot write {}: {e}", meta_path.display()))?;
            meta
        }
        Err(e) => return Err(format!("cannot read {}: {e}", meta_path.display())),
    };
    Ok(DataDir { root, meta, _lock: lock })
}

fn check(meta: &Meta, cfg: &NodeConfig, shown: &str) -> Result<(), String> {
    if meta.format != 1 {
        return Err(format!("data directory {shown} has format {}, this build reads format 1", meta.format));
    }
    if u64::from_str_radix(&meta.incarnation, 16).is_err() {
        return Err(format!("data directory {shown}: damaged incarnation {:?}", meta.incarnation));
    }
    if let Some(id) = &cfg.node_id {
        if *id != meta.node_id {
            return Err(format!("data directory {shown} belongs to node {:?}, not {id:?}", meta.node_id));
        }
    }
    if meta.cluster != cfg.cluster {
        return Err(format!("data directory {shown} belongs to cluster {:?}, not {:?}", meta.cluster, cfg.cluster));
    }
    if meta.partitions != cfg.partitions {
        return Err(format!(
            "data directory {shown} was created with {} partitions, not {}",
            meta.partitions, cfg.partitions
        ));
    }
    if meta.shards != cfg.shard_count() {
        return Err(format!(
            "data directory {shown} was created with {} shards; start with --shards {} (changing the shard count is not supported yet)",
            meta.shards, meta.shards
        ));
    }
    Ok(())
}

fn has_shard_dirs(root: &Path) -> bool {
    fs::read_dir(root).is_ok_and(|rd| rd.flatten().any(|e| e.file_name().to_string_lossy().starts_with("shard-")))
}

/// Writes and syncs a small file: catches read-only mounts, permissions and a
/// full disk before any shard starts.
fn probe_writable(root: &Path) -> io::Result<()> {
    let path = root.join(".write-probe");
    let mut f = File::create(&path)?;
    f.write_all(&[0u8; 4096])?;
    f.sync_all()?;
    drop(f);
    fs::remove_file(&path)
}

fn lock(root: &Path) -> io::Result<File> {
    let f = OpenOptions::new().create(true).truncate(false).write(true).open(root.join(LOCK))?;
    // SAFETY: flock only reads the descriptor; the File outlives the lock.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(f)
}

fn write_meta(root: &Path, meta: &Meta) -> io::Result<()> {
    let text = toml::to_string(meta).map_err(io::Error::other)?;
    replace_file(&root.join(META), text.as_bytes())
}

/// Replaces a small file atomically and durably: written beside it, synced,
/// renamed over it, and the directory synced. A crash leaves the old file
/// or the new one, never a part. Blocking.
pub fn replace_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let name = path.file_name().ok_or_else(|| io::Error::other("a file path has a name"))?;
    let tmp = path.with_file_name(format!("{}.tmp", name.to_string_lossy()));
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    File::open(path.parent().ok_or_else(|| io::Error::other("a file path has a directory"))?)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path) -> NodeConfig {
        NodeConfig { data_dir: dir.to_path_buf(), shards: Some(2), ..Default::default() }
    }

    #[test]
    fn a_new_directory_gets_an_identity_that_later_opens_keep() {
        let dir = tempfile::tempdir().unwrap();
        let a = open(&cfg(dir.path())).unwrap();
        let inc = a.meta.incarnation();
        assert_eq!(a.meta.node_id, "127.0.0.1:7070");
        drop(a);
        let b = open(&cfg(dir.path())).unwrap();
        assert_eq!(b.meta.incarnation(), inc);
    }

    #[test]
    fn a_second_server_on_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _a = open(&cfg(dir.path())).unwrap();
        let err = open(&cfg(dir.path())).err().unwrap();
        assert!(err.contains("in use"), "{err}");
    }

    #[test]
    fn a_directory_of_another_cluster_shape_or_node_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(open(&cfg(dir.path())).unwrap());
        let other = NodeConfig { cluster: "other".into(), ..cfg(dir.path()) };
        assert!(open(&other).err().unwrap().contains("cluster"));
        let other = NodeConfig { shards: Some(3), ..cfg(dir.path()) };
        assert!(open(&other).err().unwrap().contains("--shards 2"));
        let other = NodeConfig { node_id: Some("zz".into()), ..cfg(dir.path()) };
        assert!(open(&other).err().unwrap().contains("belongs to node"));
    }

    #[test]
    fn an_unwritable_directory_fails_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain-file");
        fs::write(&file, b"x").unwrap();
        let err = open(&cfg(&file.join("sub"))).err().unwrap();
        assert!(err.contains("cannot create data directory"), "{err}");
    }
}
