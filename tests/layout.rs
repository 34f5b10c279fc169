//! The crates' modules import each other without cycles, so each can be read
//! (and changed) knowing only what it stands on. A module's imports of its own
//! parent or children do not count: that is how Rust nests a module's parts.
//! Test modules (from the first `#[cfg(test)]` of a file on) do not count either.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

#[test]
fn no_crate_has_an_import_cycle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut report = vec![];
    for krate in ["core/src", "scheduler/src", "agent/src", "src"] {
        let graph = graph(&root.join(krate));
        assert!(
            graph.len() > 3,
            "{krate}: only {} modules found",
            graph.len()
        );
        for group in tangles(&graph) {
            let sub = graph
                .iter()
                .filter(|(m, _)| group.contains(*m))
                .map(|(m, d)| (m.clone(), d.intersection(&group).cloned().collect()))
                .collect();
            let cycle = find_cycle(&sub).expect("a tangle holds a cycle");
            report.push(format!(
                "{krate}: {{{}}}, e.g. {}",
                group.into_iter().collect::<Vec<_>>().join(", "),
                cycle.join(" -> ")
            ));
        }
    }
    assert!(report.is_empty(), "import cycles:\n{}", report.join("\n"));
}

#[test]
fn the_checker_finds_a_cycle() {
    let g = BTreeMap::from([
        ("a".to_string(), BTreeSet::from(["b".to_string()])),
        ("b".to_string(), BTreeSet::from(["c".to_string()])),
        ("c".to_string(), BTreeSet::from(["a".to_string()])),
        ("d".to_string(), BTreeSet::new()),
    ]);
    let cycle = find_cycle(&g).expect("a -> b -> c -> a");
    assert_eq!(cycle.first(), cycle.last());
    assert_eq!(cycle.len(), 4);
    let text = "use crate::{a::X, b::{Y, Z}};\nfn f() { super::c::g(); crate::d::h() }";
    let paths = referenced("e::f", text);
    for want in ["a::X", "b::Y", "b::Z", "e::c::g", "d::h"] {
        assert!(paths.iter().any(|p| p == want), "{want} in {paths:?}");
    }
}

/// Module path -> the modules it imports (not its ancestors or descendants).
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let files = rust_files(src);
    let module_of = |f: &Path| -> String {
        let rel = f.strip_prefix(src).unwrap().with_extension("");
        let mut parts: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if matches!(
            parts.last().map(String::as_str),
            Some("mod" | "lib" | "main")
        ) {
            parts.pop();
        }
        parts.join("::")
    };
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(f)).collect();
    let mut graph = BTreeMap::new();
    for f in &files {
        let m = module_of(f);
        let text = std::fs::read_to_string(f).unwrap();
        let text = text.split("#[cfg(test)]").next().unwrap();
        let mut deps = BTreeSet::new();
        for path in referenced(&m, text) {
            // The longest module the path names.
            let segs: Vec<&str> = path.split("::").collect();
            let Some(target) = (1..=segs.len())
                .rev()
                .map(|n| segs[..n].join("::"))
                .find(|p| modules.contains(p))
            else {
                continue;
            };
            let related = target == m
                || target.is_empty()
                || m.starts_with(&format!("{target}::"))
                || target.starts_with(&format!("{m}::"))
                || m.is_empty();
            if !related {
                deps.insert(target);
            }
        }
        graph.insert(m, deps);
    }
    graph
}

/// The crate paths a module's text refers to, `super::` resolved.
fn referenced(module: &str, text: &str) -> Vec<String> {
    let mut out = vec![];
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        // Bytes, not chars: `i` may be inside a multi-byte character until a
        // match (ASCII) puts it on a boundary.
        let rest = &bytes[i..];
        let boundary = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        let (base, len) = if boundary && rest.starts_with(b"crate::") {
            (String::new(), "crate::".len())
        } else if boundary && rest.starts_with(b"super::") {
            let mut parent: Vec<&str> = module.split("::").filter(|s| !s.is_empty()).collect();
            let mut len = 0;
            while text[i + len..].starts_with("super::") {
                parent.pop();
                len += "super::".len();
            }
            (parent.join("::"), len)
        } else {
            i += 1;
            continue;
        };
        let (paths, used) = tree(&text[i + len..]);
        for p in paths {
            out.push(if base.is_empty() {
                p
            } else {
                format!("{base}::{p}")
            });
        }
        i += len + used.max(1);
    }
    out
}

/// The paths of a use tree (`a::b`, `{a::X, b::{Y, Z}}`) and the bytes read.
fn tree(text: &str) -> (Vec<String>, usize) {
    let ident = |s: &str| {
        s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(s.len())
    };
    let mut prefix = vec![];
    let mut i = 0;
    loop {
        let rest = &text[i..];
        if let Some(inner) = rest.strip_prefix('{') {
            let mut out = vec![];
            let mut j = 0;
            loop {
                let trimmed = inner[j..].trim_start();
                j = inner.len() - trimmed.len();
                if trimmed.starts_with('}') || trimmed.is_empty() {
                    j += 1;
                    break;
                }
                let (paths, used) = tree(trimmed);
                out.extend(paths.into_iter().map(|p| {
                    let mut full = prefix.clone();
                    full.push(p);
                    full.join("::")
                }));
                j += used.max(1);
                let after = inner[j..].trim_start();
                j = inner.len() - after.len();
                if let Some(a) = after.strip_prefix(',') {
                    j = inner.len() - a.len();
                }
            }
            return (out, i + 1 + j);
        }
        let n = ident(rest);
        if n == 0 {
            break;
        }
        prefix.push(rest[..n].to_string());
        i += n;
        if text[i..].starts_with("::") {
            i += 2;
        } else {
            break;
        }
    }
    if prefix.is_empty() {
        (vec![], i)
    } else {
        (vec![prefix.join("::")], i)
    }
}

/// The groups of modules that each reach all the others (more than one).
fn tangles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<BTreeSet<String>> {
    let reach = |from: &String| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.clone()];
        while let Some(n) = todo.pop() {
            for d in graph.get(&n).into_iter().flatten() {
                if seen.insert(d.clone()) {
                    todo.push(d.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&String, BTreeSet<String>> =
        graph.keys().map(|n| (n, reach(n))).collect();
    let mut groups: Vec<BTreeSet<String>> = vec![];
    for (n, r) in &reaches {
        let group: BTreeSet<String> = r
            .iter()
            .filter(|m| reaches.get(m).is_some_and(|rm| rm.contains(*n)))
            .cloned()
            .collect();
        if group.len() > 1 && !groups.contains(&group) {
            groups.push(group);
        }
    }
    groups
}

fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    // Depth-first search; a grey node met again closes a cycle.
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for d in graph.get(n).into_iter().flatten() {
            match state.get(d.as_str()).copied().unwrap_or(0) {
                1 => {
                    let start = stack.iter().position(|s| s == d).unwrap();
                    let mut cycle = stack[start..].to_vec();
                    cycle.push(d.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(d, graph, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            let mut stack = vec![];
            if let Some(c) = visit(n, graph, &mut state, &mut stack) {
                return Some(c);
            }
        }
    }
    None
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(rust_files(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out
}
