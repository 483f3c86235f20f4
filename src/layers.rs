//! The layer table of the crate and the test that keeps it: a module may name (`crate::...`)
//! only modules of lower layers, so the import graph has no circle.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Top-level module -> layer; see the table in `lib.rs`.
pub const LAYERS: &[(&str, u8)] = &[
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
