//! `coop`: the CLI and the daemons of a co-op GPU cluster.

mod accounts;
mod args;
mod audit;
mod client;
mod commands;
mod daemons;
mod habits;
mod simulate;
mod view;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

use args::{Cli, ClientArgs, Command, Output};

fn main() -> ExitCode {
    // A client's output piped into `head` ends like `ls | head`: by SIGPIPE,
    // not with a panic in println!. SIGPIPE itself stays ignored (Rust's
    // default): TLS and HTTP/2 write to sockets with writev, which raises it
    // when a scheduler hangs up, and that must be an error, not a death.
    quiet_on_closed_stdout();
    let cli = match parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind::*;
            if matches!(
                e.kind(),
                DisplayHelp | DisplayVersion | DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            let mut line = one_line(&e.render().to_string());
            if let Some(tip) = dash_dash_tip(&e) {
                line.push_str(&tip);
            }
            eprintln!("{line}");
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
            .with_ansi(colour(&std::io::stderr()))
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "info,h2=warn,tower=warn,hyper=warn,sqlx=warn".into()),
            )
            .init();
    }
    let rt = tokio::runtime::Runtime::new().expect("starting the tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        // Output written with a writer of its own (audit export) to a closed
        // pipe: as println! does, see quiet_on_closed_stdout.
        Err(e)
            if e.root_cause()
                .downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            die_of_sigpipe()
        }
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// Parses the command line; client flags given before the subcommand
/// (`coop --addr X job list`) apply unless given again after it.
fn parse() -> Result<Cli, clap::Error> {
    let mut cmd = Cli::command();
    let matches = cmd.try_get_matches_from_mut(std::env::args_os())?;
    let mut cli = Cli::from_arg_matches(&matches).map_err(|e| e.format(&mut cmd))?;
    let top = std::mem::take(&mut cli.client);
    let sub = matches.subcommand().map(|(_, m)| m);
    let after = |id: &str| {
        sub.and_then(|m| m.try_get_raw(id).ok().flatten().map(|_| m.value_source(id)))
            .flatten()
            == Some(clap::parser::ValueSource::CommandLine)
    };
    match client_args(&mut cli.command) {
        Some(c) => c.merge(&top, after),
        None if !top.is_empty() => {
            return Err(cmd.error(
                clap::error::ErrorKind::ArgumentConflict,
                "--addr, --token, --ca, --plain-text and --output before the subcommand are for client commands",
            ));
        }
        None => {}
    }
    Ok(cli)
}

/// The client flags of a client command.
fn client_args(c: &mut Command) -> Option<&mut ClientArgs> {
    match c {
        Command::Job(g) => Some(&mut g.client),
        Command::Member(g) => Some(&mut g.client),
        Command::Auditor(g) => Some(&mut g.client),
        Command::Operator(g) => Some(&mut g.client),
        Command::Policy(g) => Some(&mut g.client),
        Command::Audit(g) => Some(&mut g.client),
        Command::Cluster(g) => Some(&mut g.client),
        Command::Node(g) => Some(&mut g.client),
        Command::Usage(a) => Some(&mut a.client),
        Command::Fairshare(a) => Some(&mut a.client),
        Command::Dev(_)
        | Command::Scheduler(_)
        | Command::Agent(_)
        | Command::Ca(_)
        | Command::Simulate(_) => None,
    }
}

/// When stdout is a closed pipe, `println!` panics with "failed printing to
/// stdout: Broken pipe": end as a Unix tool does instead, by SIGPIPE.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            die_of_sigpipe();
        }
        default(info)
    }));
}

/// Ends the process as SIGPIPE ends `ls` in `ls | head`.
fn die_of_sigpipe() -> ! {
    set_sigpipe(nix::sys::signal::SigHandler::SigDfl);
    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGPIPE);
    std::process::exit(141)
}

fn set_sigpipe(h: nix::sys::signal::SigHandler) {
    // SAFETY: SIG_DFL and SIG_IGN are not handlers that run code.
    let _ = unsafe { nix::sys::signal::signal(nix::sys::signal::Signal::SIGPIPE, h) };
}

/// Colour in logs only on a terminal, and never with NO_COLOR set
/// (https://no-color.org: present and not empty).
fn colour(stream: &impl std::io::IsTerminal) -> bool {
    stream.is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// The agent's subcommands as a client: its CA and plain-text permission
/// (run), or its output format (status, probe).
fn agent_client(cmd: &args::AgentCmd) -> anyhow::Result<ClientArgs> {
    let mut c = ClientArgs::from_env().map_err(|e| {
        let text = e.render().to_string();
        let first = text.lines().next().unwrap_or_default();
        anyhow::anyhow!("{}", first.trim_start_matches("error: "))
    })?;
    c.ca = None;
    c.plain_text = false;
    c.output = Output::Table;
    match cmd {
        args::AgentCmd::Run(a) => {
            c.ca = a.conn.ca.clone();
            c.plain_text = a.conn.plain_text;
        }
        args::AgentCmd::Status(a) => c.output = a.output.output,
        args::AgentCmd::Probe(a) => c.output = a.output.output,
    }
    Ok(c)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Dev(a) => daemons::dev(a).await,
        Command::Scheduler(cmd) => daemons::scheduler(cmd).await,
        Command::Agent(cmd) => daemons::agent(&agent_client(&cmd)?, cmd).await,
        Command::Job(g) => commands::job(&g.client, g.cmd).await,
        Command::Member(g) => accounts::member(&g.client, g.cmd).await,
        Command::Auditor(g) => accounts::auditor(&g.client, g.cmd).await,
        Command::Operator(g) => accounts::operator(&g.client, g.cmd).await,
        Command::Ca(cmd) => accounts::ca(cmd),
        Command::Usage(a) => commands::usage(&a.client.clone(), a).await,
        Command::Fairshare(a) => commands::fairshare(&a.client.clone(), a).await,
        Command::Policy(g) => commands::policy(&g.client, g.cmd).await,
        Command::Simulate(a) => simulate::run(a),
        Command::Audit(g) => audit::run(&g.client, g.cmd).await,
        Command::Cluster(g) => commands::cluster(&g.client, g.cmd).await,
        Command::Node(g) => commands::node(&g.client, g.cmd).await,
    }
}

/// A usage error on one line naming the argument, with clap's tips kept
/// ("a similar subcommand exists: 'list'", "use '-- sleep'"); `--help` has
/// the rest.
fn one_line(text: &str) -> String {
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let mut out: Vec<&str> = lines
        .iter()
        .copied()
        .skip_while(|l| l.is_empty())
        .take_while(|l| !l.is_empty())
        .collect();
    let tips: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("tip:"))
        .collect();
    // "to pass '--gpu' as a value, use '-- --gpu'" misleads where a similar
    // flag was meant (after `--` comes a job's command).
    let similar = tips.iter().any(|t| t.contains("similar"));
    out.extend(
        tips.into_iter()
            .filter(|t| !(similar && t.starts_with("tip: to pass"))),
    );
    out.join(" ")
}

/// `coop job submit sleep 10`: the command was given without `--`.
fn dash_dash_tip(e: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let submitting = std::env::args()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "submit");
    let arg = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(a)) => a.clone(),
        _ => return None,
    };
    (e.kind() == ErrorKind::UnknownArgument && submitting && !arg.starts_with('-')).then(|| {
        format!(" tip: the job's command goes after --: coop job submit [OPTIONS] -- {arg} ...")
    })
}

/// One line: a gRPC error's message and code, or the error chain.
fn describe(e: &anyhow::Error) -> String {
    if let Some(s) = e.downcast_ref::<tonic::Status>() {
        let code = format!("{:?}", s.code());
        return format!("{} ({})", s.message().replace('\n', " "), code);
    }
    format!("{e:#}").replace('\n', " ")
}
