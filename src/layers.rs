//! The layer table of the crate and the tests that keep it: a module may name (`crate::...`)
//! only modules of lower layers, so the import graph between top-level modules has no circle;
//! and inside a module, its files name each other without a circle either
//! ([`sibling_circles`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level module -> layer; see the table in `lib.rs`.
pub(crate) const LAYERS: &[(&str, u8)] = &[
    ("base", 0),
    ("protocol", 1),
    ("guest", 1),
    ("githttp", 1),
    ("document", 2),
    ("api", 2),
    ("logs", 3),
    ("git", 3),
    ("workspace", 4),
    ("image", 4),
    ("vm", 4),
    ("network", 4),
    ("sandbox", 5),
    ("cache", 5),
    ("config", 6),
    ("stage", 7),
    ("server", 7),
    ("run_loop", 8),
    ("cli", 9),
];

fn layer(module: &str) -> Option<u8> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
}

/// The top-level module a source file belongs to (`src/sandbox/oci/mod.rs` -> `sandbox`).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    Some(first.trim_end_matches(".rs").to_string())
}

/// Every module a source text names through `crate::`, including grouped `use crate::{a, b::c}`.
fn named_modules(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident =
        |s: &str| s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for part in group[..end].split(',') {
                let name = ident(part.trim());
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        } else {
            let name = ident(after);
            if !name.is_empty() {
                out.insert(name);
            }
        }
        rest = after;
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("reading src") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn lower_layers_never_name_higher_ones() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut wrong = Vec::new();
    for file in &files {
        let Some(module) = module_of(&src, file) else { continue };
        if ["lib", "main", "bin", "layers"].contains(&module.as_str()) {
            continue;
        }
        let own = layer(&module).unwrap_or_else(|| panic!("module {module} is missing from LAYERS"));
        let text = std::fs::read_to_string(file).expect("reading a source file");
        for named in named_modules(&text) {
            if named == module {
                continue;
            }
            match layer(&named) {
                Some(l) if l < own => {}
                Some(l) => wrong.push(format!(
                    "{} (layer {own}, {module}) names crate::{named} (layer {l})",
                    file.strip_prefix(&src).unwrap_or(file).display()
                )),
                None => wrong.push(format!("{} names crate::{named}, which LAYERS lacks", file.display())),
            }
        }
    }
    assert!(wrong.is_empty(), "imports that point up or sideways:\n{}", wrong.join("\n"));
}

#[test]
fn the_checker_sees_grouped_and_inline_paths() {
    let text = "use crate::{api::Client, base};\nfn f() { crate::sandbox::open(); }\n// crate::cli\n";
    let names: Vec<String> = named_modules(text).into_iter().collect();
    assert_eq!(names, ["api", "base", "cli", "sandbox"]);
    assert_eq!(module_of(Path::new("/s"), Path::new("/s/sandbox/oci/mod.rs")).as_deref(), Some("sandbox"));
    assert_eq!(module_of(Path::new("/s"), Path::new("/s/config.rs")).as_deref(), Some("config"));
    assert_eq!(layer("run_loop"), Some(8));
}

/// File-level circles that are known and waiting for their fix, as (directory under src, the
/// circle's nodes sorted). Each needs a comment saying why it is still here; none may be inside
/// `sandbox/microvm`, `guest` or `vm`.
const SIBLING_CIRCLES_ALLOWED: &[(&str, &[&str])] = &[];

/// The module path of a source file below `src` (`sandbox/microvm/mod.rs` ->
/// `[sandbox, microvm]`, `sandbox/microvm/pool/key.rs` -> `[sandbox, microvm, pool, key]`).
fn module_path(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> =
        rel.components().filter_map(|c| c.as_os_str().to_str()).map(str::to_string).collect();
    if let Some(last) = parts.pop() {
        let stem = last.trim_end_matches(".rs");
        if stem != "mod" {
            parts.push(stem.to_string());
        }
    }
    parts
}

/// The identifiers a path names right after a prefix: `x` in `x::y`, and `a`, `B` in `{a::c, B}`.
fn first_idents(after: &str) -> Vec<String> {
    let ident =
        |s: &str| s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>();
    let Some(group) = after.strip_prefix('{') else {
        return vec![ident(after)].into_iter().filter(|s| !s.is_empty()).collect();
    };
    // The group's top-level parts (nested groups skipped).
    let (mut depth, mut part, mut out) = (0usize, String::new(), Vec::new());
    for c in group.chars() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => out.push(std::mem::take(&mut part)),
            _ if depth == 0 => part.push(c),
            _ => {}
        }
    }
    out.push(part);
    out.iter().map(|p| ident(p.trim())).filter(|s| !s.is_empty()).collect()
}

/// The modules (as paths from the crate root) and items a file's code names through `crate::`
/// and `super::` paths: (module the path resolves to, the identifier that follows it). Comment
/// lines and the tests (everything from the first `#[cfg(test)]`) are left out.
fn named_paths(file_module: &[String], text: &str) -> Vec<(Vec<String>, String)> {
    let code = text.split("#[cfg(test)]").next().unwrap_or("");
    let code: String =
        code.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
    // `super` is the module path less its last element (a mod.rs's module is its directory).
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    let mut i = 0;
    while i < code.len() {
        let rest = &code[i..];
        let boundary =
            i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_' || bytes[i - 1] == b':');
        if boundary && (rest.starts_with("crate::") || rest.starts_with("super::")) {
            let (mut base, mut after) = if let Some(a) = rest.strip_prefix("crate::") {
                (Vec::new(), a)
            } else {
                (file_module.to_vec(), rest)
            };
            while let Some(a) = after.strip_prefix("super::") {
                base.pop();
                after = a;
            }
            // Follow plain module segments (`crate::sandbox::microvm::pool::X`): each is named.
            let mut module = base;
            loop {
                for id in first_idents(after) {
                    out.push((module.clone(), id));
                }
                let seg: String =
                    after.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                match after.get(seg.len()..).and_then(|a| a.strip_prefix("::")) {
                    Some(a) if !seg.is_empty() => {
                        module.push(seg);
                        after = a;
                    }
                    _ => break,
                }
            }
            i += rest.len() - after.len();
        } else {
            i += rest.chars().next().map_or(1, char::len_utf8);
        }
    }
    out
}

/// The items a module's own file brings in from its children (`use child::{A, b::C}` and
/// `pub use child::X`): a sibling naming `super::X` depends on the child that defines it.
fn reexports(parent_text: &str, children: &BTreeSet<String>) -> BTreeMap<String, String> {
    let code = parent_text.split("#[cfg(test)]").next().unwrap_or("");
    let mut out = BTreeMap::new();
    let prefixes = ["use ", "pub use ", "pub(crate) use ", "pub(super) use "];
    for stmt in code.split(';') {
        // The statement from its `use` line on (doc comments and attributes before it dropped).
        let stmt: Vec<&str> =
            stmt.lines().map(str::trim).skip_while(|l| !prefixes.iter().any(|p| l.starts_with(p))).collect();
        let stmt = stmt.join(" ");
        let Some(path) = prefixes.iter().find_map(|p| stmt.strip_prefix(p)) else { continue };
        let path = path.trim_start_matches("self::");
        let child: String = path.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if !children.contains(&child) {
            continue;
        }
        let tail = &path[child.len()..];
        let last = |s: &str| s.rsplit("::").next().unwrap_or("").trim().to_string();
        let items: Vec<String> = match (tail.find('{'), tail.rfind('}')) {
            (Some(a), Some(b)) => tail[a + 1..b].split(',').map(last).collect(),
            _ => vec![last(tail)],
        };
        for item in items.into_iter().filter(|s| !s.is_empty() && s != "*" && s != "self") {
            let item = item.rsplit(" as ").next().unwrap_or(&item).trim().to_string();
            out.insert(item, child.clone());
        }
    }
    out
}

/// The file-level circles among the children of each module below `src` (a top-level
/// module's or a nested one's): each child is a node (`x.rs`, or `x/` with everything in it);
/// an edge goes from a child to the sibling its code names (`super::x`, `crate::<path>::x`, or
/// an item the module's own file re-exports from `x`). The module's own file (`mod.rs`, or
/// `x.rs` beside `x/`) is the module's face: it declares and re-exports its children, and its
/// children may use what it defines, so it is no node. Calls of methods defined in a sibling's
/// `impl` block are not seen (only paths are). Returns (directory, sorted nodes) per circle.
fn sibling_circles(src: &Path) -> Vec<(String, Vec<String>)> {
    let mut paths = Vec::new();
    rust_files(src, &mut paths);
    // (path below src, module path, whether it is its module's own file, text)
    let files: Vec<(PathBuf, Vec<String>, bool, String)> = paths
        .iter()
        .map(|f| {
            let r = f.strip_prefix(src).unwrap_or(f).to_path_buf();
            let m = module_path(&r);
            let own = r.file_name().is_some_and(|n| n == "mod.rs") || src.join(m.join("/")).is_dir();
            (r, m, own, std::fs::read_to_string(f).unwrap_or_default())
        })
        .collect();
    // Modules below the top level's that have children: module path -> (children, own text).
    let mut dirs: BTreeMap<Vec<String>, (BTreeSet<String>, String)> = BTreeMap::new();
    for (r, m, _, _) in &files {
        if r.components().count() >= 2 && m.len() >= 2 {
            dirs.entry(m[..m.len() - 1].to_vec()).or_default().0.insert(m[m.len() - 1].clone());
        }
    }
    for (_, m, own, text) in &files {
        if let (true, Some(d)) = (*own, dirs.get_mut(m)) {
            d.1 = text.clone();
        }
    }
    let mut circles = Vec::new();
    for (dir, (children, parent_text)) in &dirs {
        let re = reexports(parent_text, children);
        let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (_, m, _, text) in &files {
            // Only files inside one child of `dir` (its own file is no node).
            if m.len() <= dir.len() || m[..dir.len()] != dir[..] {
                continue;
            }
            let from = &m[dir.len()];
            for (module, id) in named_paths(m, text) {
                if module != *dir {
                    // `crate::<dir>::x::...` names x through a longer path: seen when module is dir.
                    continue;
                }
                let to = if children.contains(&id) { Some(id.clone()) } else { re.get(&id).cloned() };
                if let Some(to) = to.filter(|t| t != from) {
                    edges.entry(from.clone()).or_default().insert(to);
                }
            }
        }
        for scc in strongly_connected(children, &edges) {
            circles.push((dir.join("/"), scc));
        }
    }
    circles
}

/// The strongly connected components of more than one node (Tarjan's algorithm), each sorted.
fn strongly_connected(
    nodes: &BTreeSet<String>,
    edges: &BTreeMap<String, BTreeSet<String>>,
) -> Vec<Vec<String>> {
    struct T<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        let n = t.index.len();
        t.index.insert(v, n);
        t.low.insert(v, n);
        t.stack.push(v);
        t.on.insert(v);
        if let Some(ws) = t.edges.get(v) {
            for w in ws {
                if !t.index.contains_key(w.as_str()) {
                    visit(t, w);
                    let lw = t.low[w.as_str()];
                    let lv = t.low[v];
                    t.low.insert(v, lv.min(lw));
                } else if t.on.contains(w.as_str()) {
                    let iw = t.index[w.as_str()];
                    let lv = t.low[v];
                    t.low.insert(v, lv.min(iw));
                }
            }
        }
        if t.low[v] == t.index[v] {
            let mut scc = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                scc.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if scc.len() > 1 {
                scc.sort();
                t.out.push(scc);
            }
        }
    }
    let mut t = T {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in nodes {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

#[test]
fn files_of_a_module_never_name_each_other_in_a_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let found = sibling_circles(&src);
    let allowed: Vec<(String, Vec<String>)> = SIBLING_CIRCLES_ALLOWED
        .iter()
        .map(|(d, n)| (d.to_string(), n.iter().map(|s| s.to_string()).collect()))
        .collect();
    let new: Vec<String> = found
        .iter()
        .filter(|c| !allowed.contains(c))
        .map(|(d, n)| format!("src/{d}: {}", n.join(" <-> ")))
        .collect();
    assert!(new.is_empty(), "files that import each other in a circle:\n{}", new.join("\n"));
    let fixed: Vec<String> = allowed
        .iter()
        .filter(|c| !found.contains(c))
        .map(|(d, n)| format!("src/{d}: {}", n.join(" <-> ")))
        .collect();
    assert!(
        fixed.is_empty(),
        "circles gone: remove them from SIBLING_CIRCLES_ALLOWED:\n{}",
        fixed.join("\n")
    );
    for (d, _) in SIBLING_CIRCLES_ALLOWED {
        for mine in ["sandbox/microvm", "guest", "vm"] {
            assert!(!d.starts_with(mine), "a circle in src/{d} must be fixed, not allowed");
        }
    }
}

/// The checker itself: a circle through `super::` paths, through a grouped import, through an
/// item the parent re-exports, and through a nested directory, in a crate made up for it.
#[test]
fn the_circle_checker_sees_siblings_and_reexports() {
    let d = tempfile::tempdir().unwrap();
    let w = |p: &str, t: &str| {
        let p = d.path().join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, t).unwrap();
    };
    // guest: agent <-> net by plain paths (the circle this test was written for).
    w("guest/mod.rs", "pub mod agent;\npub mod net;\npub mod protocol;\n");
    w("guest/agent.rs", "use super::protocol::*;\nfn f() { super::net::configure(); }\n");
    w("guest/net.rs", "use super::agent::{cmdline_value, wait_for};\n");
    w("guest/protocol.rs", "// crate::guest::agent in a comment is no edge\n");
    // m: a -> b through a re-export of the parent, b -> a through crate::; c only points down.
    w("m/mod.rs", "mod a;\nmod b;\nmod c;\npub use b::{Thing, other as Renamed};\nstruct Root;\n");
    w("m/a.rs", "use super::{Root, Thing};\n");
    w("m/b.rs", "use crate::m::a::f;\n");
    w("m/c.rs", "use super::{Root, Renamed};\n#[cfg(test)]\nmod tests { use super::super::a; }\n");
    // n: x (a file beside its directory) and y, where x/deep.rs names y and y names x.
    w("n/mod.rs", "mod x;\nmod y;\n");
    w("n/x.rs", "mod deep;\n");
    w("n/x/deep.rs", "use super::super::y::Y;\n");
    w("n/y.rs", "fn g() { super::x::h(); }\n");
    let found = sibling_circles(d.path());
    let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert_eq!(
        found,
        vec![
            ("guest".to_string(), v(&["agent", "net"])),
            ("m".to_string(), v(&["a", "b"])),
            ("n".to_string(), v(&["x", "y"])),
        ]
    );
    assert_eq!(module_path(Path::new("sandbox/microvm/mod.rs")), v(&["sandbox", "microvm"]));
    assert_eq!(first_idents("{a::b, C, d::{e, f}}"), v(&["a", "C", "d"]));
}

/// Finding 3 of the security review: children inherited the executor's environment (its shared
/// secret). Every child starts from `base::proc::command`, which clears it; outside tests no
/// file may build a `Command` any other way.
#[test]
fn every_child_starts_from_an_empty_environment() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut offenders = Vec::new();
    for f in files {
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if f.ends_with("base/proc.rs") || name.ends_with("tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        for (n, line) in code.lines().enumerate() {
            if line.contains("Command::new(") {
                offenders.push(format!(
                    "{}:{}: {}",
                    f.strip_prefix(&src).unwrap_or(&f).display(),
                    n + 1,
                    line.trim()
                ));
            }
        }
    }
    assert!(offenders.is_empty(), "start children with base::proc::command:\n{}", offenders.join("\n"));
}
