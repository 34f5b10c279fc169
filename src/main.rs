//! `coop`: the CLI and the daemons of a co-op GPU cluster.

mod accounts;
mod args;
mod audit;
mod client;
mod commands;
mod daemons;
mod habits;
mod simulate;

use std::process::ExitCode;

use clap::Parser;

use args::{Cli, Command};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind::*;
            if matches!(
                e.kind(),
                DisplayHelp | DisplayVersion | DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            // One line naming the argument; `--help` has the rest.
            let text = e.render().to_string();
            let first: Vec<&str> = text
                .lines()
                .skip_while(|l| l.trim().is_empty())
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            eprintln!("{}", first.join(" "));
            return ExitCode::from(2);
        }
    };
    let daemon = matches!(
        cli.command,
        Command::Dev(_) | Command::Scheduler(_) | Command::Agent(_)
    );
    if daemon {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "info,h2=warn,tower=warn,hyper=warn,sqlx=warn".into()),
            )
            .init();
    }
    let rt = tokio::runtime::Runtime::new().expect("starting the tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let c = &cli.client;
    match cli.command {
        Command::Dev(a) => daemons::dev(a).await,
        Command::Scheduler(cmd) => daemons::scheduler(cmd).await,
        Command::Agent(cmd) => daemons::agent(c, cmd).await,
        Command::Job(cmd) => commands::job(c, cmd).await,
        Command::Member(cmd) => accounts::member(c, cmd).await,
        Command::Auditor(cmd) => accounts::auditor(c, cmd).await,
        Command::Operator(cmd) => accounts::operator(c, cmd).await,
        Command::Ca(cmd) => accounts::ca(cmd),
        Command::Usage(a) => commands::usage(c, a).await,
        Command::Fairshare(a) => commands::fairshare(c, a).await,
        Command::Policy(cmd) => commands::policy(c, cmd).await,
        Command::Simulate(a) => simulate::run(a),
        Command::Audit(cmd) => audit::run(c, cmd).await,
        Command::Cluster(cmd) => commands::cluster(c, cmd).await,
        Command::Node(cmd) => commands::node(c, cmd).await,
    }
}

/// One line: a gRPC error's message and code, or the error chain.
fn describe(e: &anyhow::Error) -> String {
    if let Some(s) = e.downcast_ref::<tonic::Status>() {
        let code = format!("{:?}", s.code());
        return format!("{} ({})", s.message().replace('\n', " "), code);
    }
    format!("{e:#}").replace('\n', " ")
}
