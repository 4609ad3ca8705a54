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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("RINGKV_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
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
            let (code, msg) = match f {
                Failure::NotFound => (1, "not found".to_string()),
                Failure::Usage(m) => (2, m),
                Failure::Refused(m) => (3, m),
                Failure::Unreachable(m) => (4, m),
                Failure::Server(m) => (1, m),
            };
            eprintln!("ringkv: {msg}");
            ExitCode::from(code)
        }
    }
}
