//! The `ringkv server` flags, built from the node's settings table, and the
//! merge of defaults, the TOML file and the flags.
//!
//! Nothing about a setting is written here: each flag, its help, its
//! default and its check come from `NodeConfig::settings()`. Invariant: a
//! flag overrides the file only when it was given on the command line (or
//! through its environment variable), never because clap filled in its
//! default.

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};
use ringkv_engine::config::setting::Flag;
use ringkv_engine::config::{NodeConfig, Setting};
use std::path::{Path, PathBuf};

/// The id of `--config`, which is not a setting (it names where they are).
const CONFIG: &str = "config";

/// What `ringkv server` was given: the file, and each setting's flag that
/// was on the command line.
#[derive(Debug, Clone, Default)]
pub struct ServerArgs {
    pub config: Option<PathBuf>,
    given: Vec<(Setting, Given)>,
}

#[derive(Debug, Clone)]
enum Given {
    Values(Vec<String>),
    Switch,
    File(PathBuf),
}

impl clap::Args for ServerArgs {
    fn augment_args(cmd: Command) -> Command {
        let config = Arg::new(CONFIG)
            .long("config")
            .value_name("FILE")
            .value_parser(clap::value_parser!(PathBuf))
            .help("A TOML file with any of these settings (flags given here override it); see docs/CONFIG.md");
        NodeConfig::settings().into_iter().filter_map(flag).fold(cmd.arg(config), Command::arg)
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

/// The flag of one setting, or none for a file-only one.
fn flag(s: Setting) -> Option<Arg> {
    let name = s.flag_name()?;
    let check = s.check;
    let arg = Arg::new(s.key).long(name).help(s.doc_line());
    let valued = |arg: Arg| {
        let arg = arg.value_name(s.placeholder).value_parser(move |v: &str| check(v).map(|()| v.to_string()));
        match &s.default {
            Some(d) => arg.default_value(d.clone()),
            None => arg,
        }
    };
    Some(match s.flag {
        Flag::Value => valued(arg).action(ArgAction::Set),
        Flag::Env(var) => valued(arg).action(ArgAction::Set).env(var),
        Flag::List(_) => valued(arg).action(ArgAction::Append).value_delimiter(','),
        Flag::Switch(_) => {
            arg.action(ArgAction::SetTrue).help(format!("Sets {} to {}. {}", s.key, s.switched_value(), s.doc_line()))
        }
        Flag::SecretFile(_) | Flag::SecretLines(_) => {
            arg.value_name("PATH").value_parser(clap::value_parser!(PathBuf)).action(ArgAction::Set)
        }
        Flag::FileOnly => return None,
    })
}

impl clap::FromArgMatches for ServerArgs {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let mut given = Vec::new();
        for s in NodeConfig::settings() {
            // File-only settings have no argument to ask about.
            if s.flag_name().is_none() {
                continue;
            }
            if !matches!(m.value_source(s.key), Some(ValueSource::CommandLine | ValueSource::EnvVariable)) {
                continue;
            }
            let what = match s.flag {
                Flag::Switch(_) => Given::Switch,
                Flag::SecretFile(_) | Flag::SecretLines(_) => {
                    Given::File(m.get_one::<PathBuf>(s.key).cloned().unwrap_or_default())
                }
                _ => Given::Values(m.get_many::<String>(s.key).into_iter().flatten().cloned().collect()),
            };
            given.push((s, what));
        }
        Ok(ServerArgs { config: m.get_one::<PathBuf>(CONFIG).cloned(), given })
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl ServerArgs {
    /// Defaults, overridden by the config file, overridden by the flags
    /// given; then every value is checked.
    pub fn resolve(&self) -> Result<NodeConfig, String> {
        let mut c = match &self.config {
            Some(path) => NodeConfig::from_toml_file(path)?,
            None => NodeConfig::default(),
        };
        for (s, given) in &self.given {
            let values = match given {
                Given::Values(v) => v.clone(),
                Given::Switch => vec![s.switched_value().to_string()],
                Given::File(path) => {
                    let text = read_secret(path)?;
                    match s.flag {
                        Flag::SecretLines(_) => text.lines().map(|l| l.trim().to_string()).collect(),
                        _ => vec![text.trim().to_string()],
                    }
                }
            };
            c.set_from_flag(s.key, &values)?;
        }
        c.validate()?;
        Ok(c)
    }
}

fn read_secret(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command as Cmd};
    use clap::{CommandFactory, Parser};

    fn parse(args: &[&str]) -> Result<NodeConfig, String> {
        let argv = ["ringkv", "server"].iter().chain(args);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        match cli.command {
            Cmd::Server(a) => a.resolve(),
            _ => panic!("not the server command"),
        }
    }

    fn file(dir: &Path, name: &str, text: &str) -> String {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    }

    #[test]
    fn without_flags_or_a_file_the_defaults_hold() {
        assert_eq!(parse(&[]).unwrap(), NodeConfig::default());
    }

    #[test]
    fn flags_given_override_the_file_and_the_file_overrides_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let toml = "weight = 3\ncluster = \"prod\"\npin_cpus = false\nreplicas = 2\nseeds = [\"127.0.0.2:7070\"]\n";
        let config = file(dir.path(), "node.toml", toml);
        let c = parse(&[
            "--config",
            &config,
            "--weight",
            "5",
            "--seeds",
            "127.0.0.3:1,127.0.0.4:1",
            "--seeds",
            "127.0.0.5:1",
        ])
        .unwrap();
        assert_eq!(c.weight, 5, "the flag wins");
        assert_eq!(c.seeds, ["127.0.0.3:1", "127.0.0.4:1", "127.0.0.5:1"], "the flag wins, items accumulate");
        // Flags that were not given keep the file's values, although clap
        // knows a default for each of them.
        assert_eq!((c.cluster.as_str(), c.replicas, c.pin_cpus), ("prod", 2, false));
        assert_eq!(c.listen, NodeConfig::default().listen, "neither file nor flag: the default");
        let c = parse(&["--no-pin", "--seeds", ""]).unwrap();
        assert!(!c.pin_cpus && c.seeds.is_empty());
    }

    #[test]
    fn secrets_come_from_the_files_their_flags_name() {
        let dir = tempfile::tempdir().unwrap();
        let secret = file(dir.path(), "secret", "  cluster-secret-0123456789\n");
        let tokens = file(dir.path(), "tokens", "token-one-0123456789\n\n  token-two-0123456789  \n");
        let c = parse(&["--cluster-secret-file", &secret, "--auth-tokens-file", &tokens]).unwrap();
        assert_eq!(c.cluster_secret.as_deref(), Some("cluster-secret-0123456789"));
        assert_eq!(c.auth_tokens, ["token-one-0123456789", "token-two-0123456789"]);
        let missing = dir.path().join("missing");
        let e = parse(&["--cluster-secret-file", missing.to_str().unwrap()]).unwrap_err();
        assert!(e.starts_with("cannot read ") && e.contains("missing"), "{e}");
    }

    #[test]
    fn bad_values_are_refused_with_the_setting_named() {
        let e = parse(&["--weight", "lots"]).unwrap_err();
        assert!(e.contains("--weight") && e.contains("\"lots\" is not a whole number"), "{e}");
        let e = parse(&["--log-format", "xml"]).unwrap_err();
        assert!(e.contains("--log-format") && e.contains("is not text or json"), "{e}");
        assert!(parse(&["--weight", "0"]).unwrap_err().starts_with("weight must be between 1 and"));
        assert_eq!(parse(&["--seeds", "nowhere"]).unwrap_err(), "seed \"nowhere\" is not an IP:PORT address");
        assert!(parse(&["--auth-users", "x"]).is_err(), "users are set in the file only");
        let c = parse(&["--metrics", "127.0.0.1:9100", "--slow-request-ms", "0", "--log-format", "json"]).unwrap();
        assert_eq!((c.metrics.map(|m| m.port()), c.slow_request_ms), (Some(9100), 0));
    }

    #[test]
    fn server_help_lists_every_flag_of_the_settings_table_with_its_default() {
        let mut cli = Cli::command();
        let help = cli.find_subcommand_mut("server").unwrap().render_long_help().to_string();
        for s in NodeConfig::settings() {
            if let Some(name) = s.flag_name() {
                assert!(help.contains(&format!("--{name}")), "--{name} missing from:\n{help}");
            }
        }
        assert!(help.contains("[default: 127.0.0.1:7070]"), "{help}");
        assert!(help.contains("Sets pin_cpus to false."), "{help}");
    }
}
