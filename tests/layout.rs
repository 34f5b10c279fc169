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
    let code = code_of(
        "use crate::a::X; // crate::b::Y\n#[cfg(test)]\nmod tests {\n    use crate::c::Z;\n    fn f() { {} }\n}\nfn g() { crate::d::h() }",
    );
    assert_eq!(referenced("e", &code), ["a::X", "d::h"], "{code}");
}

/// Module path -> the sibling modules it stands on. An import from deep in
/// one module of another's part counts between the two siblings under their
/// common ancestor (`state::jobs` using `habits::Blocked` is `state` -> `habits`),
/// and a name re-exported with `pub use` counts as the module that defines it.
/// A module's imports of its own ancestors or descendants do not count.
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
    // Test modules in files of their own (`#[cfg(test)] mod tests;`) do not count.
    let mut tests = BTreeSet::new();
    for f in &files {
        let m = module_of(f);
        let text = std::fs::read_to_string(f).unwrap();
        for after in text.split("#[cfg(test)]").skip(1) {
            let item = after.trim_start();
            if let Some(name) = item.strip_prefix("mod ").and_then(|r| r.split(';').next())
                && !name.contains('{')
            {
                let name = name.trim();
                tests.insert(if m.is_empty() {
                    name.to_string()
                } else {
                    format!("{m}::{name}")
                });
            }
        }
    }
    let texts: BTreeMap<String, String> = files
        .iter()
        .map(|f| (module_of(f), f))
        .filter(|(m, _)| {
            !tests
                .iter()
                .any(|t| m == t || m.starts_with(&format!("{t}::")))
        })
        .map(|(m, f)| (m, code_of(&std::fs::read_to_string(f).unwrap())))
        .collect();
    let modules: BTreeSet<String> = texts.keys().cloned().collect();
    let longest = |path: &str| -> Option<(String, Vec<String>)> {
        let segs: Vec<&str> = path.split("::").collect();
        (0..=segs.len()).rev().find_map(|n| {
            let m = segs[..n].join("::");
            modules
                .contains(&m)
                .then(|| (m, segs[n..].iter().map(|s| s.to_string()).collect()))
        })
    };
    // (module, name) -> the path it re-exports.
    let mut reexports: BTreeMap<(String, String), String> = BTreeMap::new();
    for (m, text) in &texts {
        for stmt in text.split("pub use ").skip(1) {
            let (paths, _) = tree(stmt);
            for p in paths {
                let name = p.rsplit("::").next().unwrap().to_string();
                let full = if let Some(rest) = p.strip_prefix("crate::") {
                    rest.to_string()
                } else if p.starts_with("super::") {
                    match referenced(m, &p).pop() {
                        Some(r) => r,
                        None => continue,
                    }
                } else if m.is_empty() {
                    p.clone()
                } else {
                    format!("{m}::{p}")
                };
                reexports.insert((m.clone(), name), full);
            }
        }
    }
    let resolve = |path: &str| -> Option<String> {
        let mut path = path.to_string();
        for _ in 0..8 {
            let (m, rest) = longest(&path)?;
            match rest
                .first()
                .and_then(|n| reexports.get(&(m.clone(), n.clone())))
            {
                Some(to) if *to != path => {
                    path = std::iter::once(to.clone())
                        .chain(rest[1..].iter().cloned())
                        .collect::<Vec<_>>()
                        .join("::")
                }
                _ => return Some(m),
            }
        }
        longest(&path).map(|(m, _)| m)
    };
    let mut graph: BTreeMap<String, BTreeSet<String>> = modules
        .iter()
        .map(|m| (m.clone(), BTreeSet::new()))
        .collect();
    for (m, text) in &texts {
        for path in referenced(m, text) {
            let Some(target) = resolve(&path) else {
                continue;
            };
            let a: Vec<&str> = m.split("::").filter(|s| !s.is_empty()).collect();
            let b: Vec<&str> = target.split("::").filter(|s| !s.is_empty()).collect();
            let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
            if common == a.len() || common == b.len() {
                continue; // the same module, an ancestor or a descendant
            }
            let from = a[..=common].join("::");
            let to = b[..=common].join("::");
            graph.entry(from).or_default().insert(to);
        }
    }
    graph
}

/// A file's code without its comments and without `#[cfg(test)]` modules.
fn code_of(text: &str) -> String {
    let no_comments: String = text
        .lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = String::new();
    let mut rest = no_comments.as_str();
    while let Some(i) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..i]);
        let after = &rest[i + "#[cfg(test)]".len()..];
        let item = after.trim_start();
        if item.starts_with("mod ") {
            match (item.find(';'), item.find('{')) {
                (Some(semi), brace) if brace.is_none_or(|b| semi < b) => {
                    rest = &item[semi + 1..];
                }
                (_, Some(open)) => {
                    let mut depth = 0;
                    let mut end = item.len();
                    for (j, c) in item[open..].char_indices() {
                        match c {
                            '{' => depth += 1,
                            '}' => {
                                depth -= 1;
                                if depth == 0 {
                                    end = open + j + 1;
                                    break;
                                }
                            }
                            _ => {}
                        }
                    }
                    rest = &item[end..];
                }
                _ => rest = after,
            }
        } else {
            rest = after;
        }
    }
    out.push_str(rest);
    out
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
