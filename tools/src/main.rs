//! The `ringkv` binary: the server and the command-line client.

mod autoscale_cmd;
mod cli;
mod client_cmd;
mod cluster_cmd;
mod config_reference;
mod inspect_cmd;
mod ring_cmd;
mod sd_notify;
mod server_args;
mod server_cmd;

use clap::Parser;
use cli::{Cli, ClusterCmd, Command};
use ringkv_engine::config::setting::{Flag, Scalar};
use ringkv_engine::config::{LogFormat, NodeConfig};
use std::process::ExitCode;

/// How a command failed; each kind has its own exit code.
pub enum Failure {
    /// The key does not exist (exit 1).
    NotFound,
    /// Bad flags or input (exit 2, like clap's own usage errors).
    Usage(String),
    /// The node answered with an error (exit 3).
    Refused(String),
    /// No answer: the node is unreachable, timed out or the local I/O failed (exit 4).
    Unreachable(String),
    /// The server could not start or stopped with an error (exit 1).
    Server(String),
}

impl Failure {
    /// Its exit code, and what to say.
    fn code(&self) -> u8 {
        match self {
            Failure::NotFound | Failure::Server(_) => 1,
            Failure::Usage(_) => 2,
            Failure::Refused(_) => 3,
            Failure::Unreachable(_) => 4,
        }
    }

    pub fn message(&self) -> String {
        match self {
            Failure::NotFound => "not found".into(),
            Failure::Usage(m) | Failure::Refused(m) | Failure::Unreachable(m) | Failure::Server(m) => m.clone(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A server's log format is one of its settings (flag, $RINGKV_LOG_FORMAT
    // or the file), so they are resolved before the first line is logged.
    let server = match &cli.command {
        Command::Server(a) => Some(a.resolve()),
        _ => None,
    };
    let format = match &server {
        Some(Ok(cfg)) => Ok(cfg.log_format),
        _ => log_format_from_env(),
    };
    let result = match format {
        Ok(format) => {
            init_logs(format);
            match server {
                Some(cfg) => cfg.and_then(server_cmd::run).map_err(Failure::Server),
                None => run(&cli.command),
            }
        }
        Err(f) => Err(f),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("ringkv: {}", f.message());
            ExitCode::from(f.code())
        }
    }
}

/// The variable that stands in for `--log-format` (the server's setting
/// declares it; client commands honour it too).
fn log_format_from_env() -> Result<LogFormat, Failure> {
    let setting = NodeConfig::settings().into_iter().find(|s| s.key == "log_format");
    let var = match setting.map(|s| s.flag) {
        Some(Flag::Env(var)) => var,
        _ => return Ok(LogFormat::Text),
    };
    match std::env::var(var) {
        Ok(v) => <LogFormat as Scalar>::parse(&v).map_err(|e| Failure::Usage(format!("{var}: {e}"))),
        Err(_) => Ok(LogFormat::Text),
    }
}

/// Logs go to stderr; levels from RINGKV_LOG or RUST_LOG (info by default).
fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RINGKV_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    match format {
        LogFormat::Json => logs.json().with_current_span(false).init(),
        LogFormat::Text => logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
    }
}

/// Every command but the server, which `main` starts itself.
fn run(command: &Command) -> Result<(), Failure> {
    match command {
        Command::Server(_) => unreachable!("main resolves and starts the server"),
        Command::ConfigReference => {
            config_reference::run();
            Ok(())
        }
        Command::Put(a) => client_cmd::put(a),
        Command::Get(a) => client_cmd::get(a),
        Command::Delete(a) => client_cmd::delete(a),
        Command::Status(a) => client_cmd::status(a),
        Command::Repair(a) => client_cmd::repair(a),
        Command::Inspect(a) => inspect_cmd::run(a),
        Command::Leave(a) => ring_cmd::leave(a),
        Command::Remove(a) => ring_cmd::remove(&a.stage, &a.id),
        Command::Weight(a) => ring_cmd::weight(a),
        Command::Plan(a) => ring_cmd::plan(a),
        Command::Commit(a) => ring_cmd::commit(a),
        Command::Cancel(a) => ring_cmd::cancel(a),
        Command::Autoscale(a) => autoscale_cmd::run(a),
        Command::Cluster(ClusterCmd::Up(a)) => cluster_cmd::up(a).map_err(Failure::Server),
    }
}
