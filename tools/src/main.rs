//! The `ringkv` binary: the server and the command-line client.

mod autoscale_cmd;
mod cli;
mod client_cmd;
mod cluster_cmd;
mod inspect_cmd;
mod ring_cmd;
mod server_cmd;

use clap::Parser;
use cli::{Cli, ClusterCmd, Command};
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
    let filter = tracing_subscriber::EnvFilter::try_from_env("RINGKV_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    match cli.log_format {
        cli::LogFormat::Json => logs.json().with_current_span(false).init(),
        cli::LogFormat::Text => logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
    }
    let result = match &cli.command {
        Command::Server(a) => server_cmd::run(a).map_err(Failure::Server),
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
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("ringkv: {}", f.message());
            ExitCode::from(f.code())
        }
    }
}
