//! The README cannot drift from the binary: its replicated-cluster block is
//! run as written (three schedulers on loopback addresses of this machine),
//! the tour's, the habits', the fair-share and the audit console blocks are
//! typed into a shell against `coop dev` (each command refused where the README shows a
//! refusal, with its first words, and each table with the README's columns),
//! and every `coop ...` command in its examples parses with the real parser.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::BIN;

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap()
}

/// The fenced blocks of `text` as (language, body).
fn blocks(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur: Option<(String, String)> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("```") {
            match cur.take() {
                Some(b) => out.push(b),
                None => cur = Some((rest.trim().to_string(), String::new())),
            }
        } else if let Some((_, body)) = cur.as_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    out
}

/// A PATH on which `coop` is the binary under test (in `dir/bin`), as a
/// reader who followed the README has it.
fn coop_on_path(dir: &Path) -> String {
    let bin = dir.join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(BIN, bin.join("coop")).unwrap();
    format!("{}:{}", bin.display(), std::env::var("PATH").unwrap())
}

/// Schedulers the script started in the background: killed (by pid) when
/// the test ends, however it ends.
struct Started(PathBuf);

impl Drop for Started {
    fn drop(&mut self) {
        let pids = std::fs::read_to_string(&self.0).unwrap_or_default();
        for pid in pids.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[test]
fn the_replicated_cluster_block_runs_as_written() {
    let text = readme();
    let section = text
        .split("### A replicated cluster")
        .nth(1)
        .expect("README: ### A replicated cluster");
    let (_, block) = blocks(section)
        .into_iter()
        .find(|(lang, _)| lang == "sh")
        .expect("a sh block");
    let dir = tempfile::tempdir().unwrap();
    let (client, peer) = (common::free_port(), common::free_port());
    // Host 10.0.0.N becomes 127.0.10.N (all of 127/8 is loopback); each
    // scheduler line runs in the background with a data dir of its own.
    let mut script = String::from("set -euo pipefail\n");
    let mut waited = false;
    for line in block.lines() {
        let mut l = line.to_string();
        if l.starts_with("coop scheduler run ") {
            let host = l.rsplit("# on ").next().unwrap().trim().to_string();
            let n = host.rsplit('.').next().unwrap();
            let (cmd, _) = l.split_once('#').unwrap();
            l = cmd
                .replace("0.0.0.0:", &format!("{host}:"))
                .replace("/var/lib/coop/scheduler", &format!("data-{n}"));
            l = format!(
                "{} >sched-{n}.out 2>sched-{n}.err & echo $! >>pids",
                l.trim_end()
            );
        }
        if l.starts_with("coop cluster status") && !waited {
            // Pasted by a person, the schedulers have long started and
            // elected a leader by then.
            waited = true;
            script.push_str(
                "for _ in $(seq 300); do coop cluster status -o json 2>/dev/null | grep -q '\"role\": \"leader\"' && break; sleep 0.2; done\n",
            );
        }
        let l = l
            .replace("10.0.0.", "127.0.10.")
            .replace(":7070", &format!(":{client}"))
            .replace(":7071", &format!(":{peer}"));
        script.push_str(&l);
        script.push('\n');
    }
    let path = coop_on_path(dir.path());
    let _started = Started(dir.path().join("pids"));
    let out = Command::new("bash")
        .args(["-c", &script])
        .current_dir(dir.path())
        .env("PATH", path)
        .env_remove("COOP_ADDR")
        .env_remove("COOP_TOKEN")
        .env_remove("COOP_CA")
        .env_remove("COOP_OPERATOR_TOKEN")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let logs: String = (1..=3)
        .map(|n| {
            std::fs::read_to_string(dir.path().join(format!("sched-{n}.err"))).unwrap_or_default()
        })
        .collect();
    assert!(
        out.status.success(),
        "the README block failed:\n{script}\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- schedulers\n{logs}"
    );
    // cluster status: three voters; member add: a token; enroll: a join token.
    assert_eq!(stdout.matches(" yes ").count(), 3, "{stdout}");
    assert!(stdout.contains("coopjoin_"), "{stdout}");
}

/// `$NAME`, `${NAME}` and `$(...)` in a README command become a placeholder.
fn fill_vars(cmd: &str) -> String {
    let mut out = String::new();
    let mut chars = cmd.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        match chars.peek() {
            Some('(') | Some('{') => {
                let close = if chars.next() == Some('(') { ')' } else { '}' };
                let mut depth = 1;
                for c in chars.by_ref() {
                    if c == '(' && close == ')' {
                        depth += 1;
                    }
                    if c == close {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                }
            }
            _ => {
                while chars
                    .peek()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_')
                {
                    chars.next();
                }
            }
        }
        out.push_str("x1");
    }
    out
}

/// Splits like a shell (quotes, no expansion).
fn words(cmd: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut any = false;
    for c in cmd.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                any = true;
            }
            (None, c) if c.is_whitespace() => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                any = false;
            }
            (None, c) => cur.push(c),
        }
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The `coop` command lines of the README's examples (console and sh
/// blocks), without prompts, comments, pipes and redirections, each with
/// the error a console block shows it answering, if any.
fn readme_commands() -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    for (lang, body) in blocks(&readme()) {
        if !matches!(lang.as_str(), "console" | "sh" | "bash") {
            continue;
        }
        let joined = body.replace("\\\n", " ");
        let lines: Vec<&str> = joined.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let line = line.trim();
            let shown = lines
                .get(i + 1)
                .filter(|next| lang == "console" && next.starts_with("error:"))
                .map(|next| next.trim().to_string());
            let line = line
                .strip_prefix("$ ")
                .unwrap_or(if lang == "console" { "" } else { line });
            // The command of `VAR=$(coop ...)` and of `ENV=x coop ...`.
            let Some(at) = line.find("coop ") else {
                continue;
            };
            let before = &line[..at];
            let plain = before.is_empty()
                || before.ends_with("$(")
                || before.split_whitespace().all(|w| w.contains('='));
            if !plain {
                continue;
            }
            let mut cmd = line[at..].to_string();
            // Cut at a comment, a pipe, a redirection, `&`, `;` or `)`.
            let mut end = cmd.len();
            let mut quote: Option<char> = None;
            for (i, c) in cmd.char_indices() {
                match (quote, c) {
                    (Some(q), c) if c == q => quote = None,
                    (Some(_), _) => {}
                    (None, '\'' | '"') => quote = Some(c),
                    (None, '#' | '|' | '>' | '<' | '&' | ';' | ')') => {
                        end = i;
                        break;
                    }
                    _ => {}
                }
            }
            cmd.truncate(end);
            out.push((cmd.trim().to_string(), shown));
        }
    }
    out
}

#[test]
fn every_coop_command_in_the_readme_parses() {
    let cmds = readme_commands();
    assert!(cmds.len() > 30, "found only {cmds:?}");
    let mut bad = Vec::new();
    for (cmd, shown) in &cmds {
        let mut args = words(&fill_vars(cmd));
        assert_eq!(args.remove(0), "coop");
        // Flags and values are checked as they are parsed; `--help` (before
        // a job's own command) then stops before anything runs.
        let at = args.iter().position(|a| a == "--").unwrap_or(args.len());
        args.insert(at, "--help".into());
        let out = Command::new(BIN).args(&args).env_clear().output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        // A shell variable stands where a typed value goes: only its type is unknown.
        let placeholder = err.contains("invalid value 'x1'");
        // An example of a refusal: the README shows the binary's words.
        if let Some(shown) = shown.as_ref().filter(|_| out.status.code() == Some(2)) {
            if err.trim() != shown {
                bad.push(format!(
                    "{cmd}\n    README: {shown}\n    coop:   {}",
                    err.trim()
                ));
            }
            continue;
        }
        if !out.status.success() && !placeholder {
            bad.push(format!(
                "{cmd}\n    {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "README commands that do not parse:\n{}",
        bad.join("\n")
    );
}

/// The README's console blocks as (command, what the README shows after it):
/// a command is a `$ ` line and the lines it continues with `\`.
fn console_commands(block: &str) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    let mut continued = false;
    for line in block.lines() {
        if let Some(cmd) = line.strip_prefix("$ ") {
            out.push((cmd.to_string(), vec![]));
            continued = cmd.ends_with('\\');
        } else if let Some((cmd, shown)) = out.last_mut() {
            if continued {
                cmd.push('\n');
                cmd.push_str(line);
                continued = line.ends_with('\\');
            } else {
                shown.push(line.to_string());
            }
        }
    }
    out
}

/// A table's header line: two or more upper-case column names.
fn header(line: &str) -> Option<Vec<String>> {
    let cols: Vec<String> = line.split_whitespace().map(String::from).collect();
    let upper = |c: &String| {
        c.chars().next().is_some_and(|f| f.is_ascii_uppercase())
            && c.chars().all(|ch| !ch.is_ascii_lowercase())
    };
    (cols.len() >= 2 && cols.iter().all(upper)).then_some(cols)
}

#[test]
fn the_console_blocks_run_against_coop_dev() {
    let c = common::Cluster::dev(&[]);
    let text = readme();
    // The blocks a reader types against `coop dev`, in the README's order and
    // in one shell each, on one cluster (the fair-share block needs the
    // member the tour adds).
    // The audit blocks follow: an export edited and caught, a head saved and
    // checked after one more entry. (The block after those needs the
    // scheduler stopped and its log edited: `tests/audit.rs` does that.)
    let firsts = [
        "id=$(coop job submit --gpus 2",
        "A=$(coop job submit --name train-llama",
        "coop policy set share.acme=3",
        "coop audit export > ledger.jsonl",
        "coop audit head\n",
        "coop member add bravo",
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = coop_on_path(dir.path());
    let mut ran = 0;
    for first in firsts {
        let (_, block) = blocks(&text)
            .into_iter()
            .find(|(lang, body)| lang == "console" && body.starts_with(&format!("$ {first}")))
            .unwrap_or_else(|| panic!("README: no console block starting with {first:?}"));
        let commands = console_commands(&block);
        // Each command's output, error and status go to files of their own.
        let mut script = String::new();
        for (i, (cmd, _)) in commands.iter().enumerate() {
            script.push_str(&format!(
                "{{\n{cmd}\n}} >out.{i} 2>err.{i}; echo $? >status.{i}\n"
            ));
        }
        let out = Command::new("bash")
            .args(["-c", &script])
            .current_dir(dir.path())
            .env("PATH", &path)
            .env("COOP_ADDR", &c.addr)
            .env("COOP_TOKEN", &c.token)
            .env("COOP_CA", c.ca.as_deref().unwrap())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for (i, (cmd, shown)) in commands.iter().enumerate() {
            let read =
                |f: &str| std::fs::read_to_string(dir.path().join(format!("{f}.{i}"))).unwrap();
            let status: i32 = read("status").trim().parse().unwrap();
            let (stdout, stderr) = (read("out"), read("err"));
            let what = format!("README command {cmd:?}\n--- stdout\n{stdout}--- stderr\n{stderr}");
            match shown.first() {
                // A refusal: refused too, with the same first words.
                Some(e) if e.starts_with("error:") => {
                    assert_ne!(status, 0, "{what}");
                    let words =
                        |t: &str| t.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
                    assert_eq!(words(&stderr), words(e), "{what}");
                }
                // A table: the same columns.
                Some(l) if header(l).is_some() => {
                    assert_eq!(status, 0, "{what}");
                    let first = stdout.lines().next().unwrap_or_default();
                    assert_eq!(header(first), header(l), "{what}");
                }
                _ => assert_eq!(status, 0, "{what}"),
            }
            ran += 1;
        }
    }
    assert!(ran >= 35, "only {ran} commands ran");
}
