//! The layer order of `docs/ARCHITECTURE.md`, enforced: every `crate::` path in `src/` and
//! `sim/src/` (outside test code) must name a module of a strictly lower layer than the
//! module it is written in, so no import circle can come back and the picture in the
//! document stays true. The tables are read from the document itself (between the
//! `<!-- layers:src -->` / `<!-- layers:sim -->` markers and `<!-- /layers -->`): change the
//! picture there, and the check follows.
//!
//! Paths are read with `syn`, so comments, strings and `#[cfg(test)]` items never count.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use syn::visit::Visit;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// One import that breaks the order.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Breach {
    file: String,
    from: String,
    to: String,
}

/// The layer of each module, from the marked table of the architecture document: one row
/// per layer, in order from the bottom, modules in backquotes in the third column.
fn layers(doc: &str, marker: &str) -> BTreeMap<String, usize> {
    let start = doc
        .find(marker)
        .unwrap_or_else(|| panic!("docs/ARCHITECTURE.md has no {marker} table"));
    let rest = &doc[start + marker.len()..];
    let table = &rest[..rest.find("<!-- /layers -->").expect("table end marker")];
    let mut out = BTreeMap::new();
    let rows = table
        .lines()
        .filter(|l| l.trim_start().starts_with('|'))
        .filter(|l| !l.contains("---"))
        .skip(1); // the header
    for (rank, row) in rows.enumerate() {
        let cells: Vec<&str> = row.split('|').collect();
        let modules = cells.get(3).expect("a modules column");
        for m in modules.split('`').skip(1).step_by(2) {
            assert!(
                out.insert(m.to_string(), rank).is_none(),
                "{m} is listed twice"
            );
        }
    }
    assert!(!out.is_empty(), "the {marker} table lists no modules");
    out
}

/// The `.rs` files under `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn is_cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.parse_args::<syn::Meta>()
                .is_ok_and(|m| m.path().is_ident("test"))
    })
}

/// Collects the first segment after `crate::` of every path and `use` tree outside
/// `#[cfg(test)]` items, and the files of `#[cfg(test)] mod x;` declarations.
#[derive(Default)]
struct Imports {
    targets: BTreeSet<String>,
    test_mods: Vec<String>,
}

impl<'ast> Visit<'ast> for Imports {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        let attrs = match item {
            syn::Item::Mod(m) => &m.attrs,
            syn::Item::Fn(f) => &f.attrs,
            syn::Item::Impl(i) => &i.attrs,
            syn::Item::Use(u) => &u.attrs,
            syn::Item::Struct(s) => &s.attrs,
            syn::Item::Enum(e) => &e.attrs,
            syn::Item::Const(c) => &c.attrs,
            syn::Item::Static(s) => &s.attrs,
            syn::Item::Trait(t) => &t.attrs,
            syn::Item::Type(t) => &t.attrs,
            syn::Item::Macro(m) => &m.attrs,
            _ => return syn::visit::visit_item(self, item),
        };
        if is_cfg_test(attrs) {
            if let syn::Item::Mod(m) = item
                && m.content.is_none()
            {
                self.test_mods.push(m.ident.to_string());
            }
            return;
        }
        syn::visit::visit_item(self, item);
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let mut segs = path.segments.iter();
        if let (Some(first), Some(second)) = (segs.next(), segs.next())
            && first.ident == "crate"
        {
            self.targets.insert(second.ident.to_string());
        }
        syn::visit::visit_path(self, path);
    }

    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        if let syn::UseTree::Path(p) = &item.tree
            && p.ident == "crate"
        {
            let mut stack = vec![&*p.tree];
            while let Some(tree) = stack.pop() {
                match tree {
                    syn::UseTree::Path(p) => {
                        self.targets.insert(p.ident.to_string());
                    }
                    syn::UseTree::Name(n) => {
                        self.targets.insert(n.ident.to_string());
                    }
                    syn::UseTree::Rename(r) => {
                        self.targets.insert(r.ident.to_string());
                    }
                    syn::UseTree::Group(g) => stack.extend(g.items.iter()),
                    syn::UseTree::Glob(_) => {}
                }
            }
        }
    }
}

/// The names the crate root re-exports (`pub use module::{A, B}`), mapped to their module.
fn root_reexports(lib: &syn::File) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut items: Vec<&syn::Item> = lib.items.iter().collect();
    while let Some(item) = items.pop() {
        match item {
            syn::Item::Use(u) => {
                if let syn::UseTree::Path(p) = &u.tree {
                    let module = p.ident.to_string();
                    let mut stack = vec![&*p.tree];
                    while let Some(t) = stack.pop() {
                        match t {
                            syn::UseTree::Name(n) => {
                                out.insert(n.ident.to_string(), module.clone());
                            }
                            syn::UseTree::Group(g) => stack.extend(g.items.iter()),
                            _ => {}
                        }
                    }
                }
            }
            // `not_under_loom! { ... }` wraps the module list of the library.
            syn::Item::Macro(m) => {
                if let Ok(file) = syn::parse2::<syn::File>(m.mac.tokens.clone()) {
                    for item in file.items {
                        if let syn::Item::Use(u) = item
                            && let syn::UseTree::Path(p) = &u.tree
                        {
                            let module = p.ident.to_string();
                            if let syn::UseTree::Group(g) = &*p.tree {
                                for i in &g.items {
                                    if let syn::UseTree::Name(n) = i {
                                        out.insert(n.ident.to_string(), module.clone());
                                    }
                                }
                            } else if let syn::UseTree::Name(n) = &*p.tree {
                                out.insert(n.ident.to_string(), module.clone());
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// Checks the crate under `src` against `table`: every module placed, every import down.
fn check(src: &Path, table: &BTreeMap<String, usize>) -> (Vec<Breach>, BTreeSet<String>) {
    let lib: syn::File = syn::parse_file(&std::fs::read_to_string(src.join("lib.rs")).unwrap())
        .expect("lib.rs parses");
    let reexports = root_reexports(&lib);
    // Parse everything first: a `#[cfg(test)] mod x;` may sort after the file it names.
    let mut parsed = Vec::new();
    let mut skip: BTreeSet<PathBuf> = BTreeSet::new();
    for file in rust_files(src) {
        let text = std::fs::read_to_string(&file).unwrap();
        let ast = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let mut v = Imports::default();
        v.visit_file(&ast);
        // `#[cfg(test)] mod tests;` in `x/mod.rs`, `x.rs` or `lib.rs` names `x/tests.rs`.
        let dir = match file.file_name().and_then(|n| n.to_str()) {
            Some("mod.rs") | Some("lib.rs") => file.parent().unwrap().to_path_buf(),
            _ => file.with_extension(""),
        };
        for m in &v.test_mods {
            skip.insert(dir.join(format!("{m}.rs")));
            skip.insert(dir.join(m).join("mod.rs"));
        }
        parsed.push((file, v));
    }
    let mut breaches = Vec::new();
    let mut unplaced = BTreeSet::new();
    for (file, v) in parsed {
        let rel = file.strip_prefix(src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" || skip.contains(&file) {
            continue;
        }
        let Some(&rank) = table.get(&module) else {
            unplaced.insert(module);
            continue;
        };
        for target in &v.targets {
            let to = reexports.get(target).unwrap_or(target);
            if *to == module {
                continue;
            }
            let ok = match table.get(to) {
                Some(&r) => r < rank,
                // An item of the crate root (not a re-export): the root is above everything.
                None => false,
            };
            if !ok {
                breaches.push(Breach {
                    file: rel.display().to_string(),
                    from: module.clone(),
                    to: to.clone(),
                });
            }
        }
    }
    breaches.sort();
    breaches.dedup();
    (breaches, unplaced)
}

fn assert_ordered(crate_dir: &str, marker: &str) {
    let doc = std::fs::read_to_string(Path::new(ROOT).join("docs/ARCHITECTURE.md"))
        .expect("docs/ARCHITECTURE.md");
    let table = layers(&doc, marker);
    let src = Path::new(ROOT).join(crate_dir);
    let (breaches, unplaced) = check(&src, &table);
    assert!(
        unplaced.is_empty(),
        "modules of {crate_dir} missing from the {marker} table of docs/ARCHITECTURE.md: \
         {unplaced:?} (place each in a layer)"
    );
    assert!(
        breaches.is_empty(),
        "imports against the layer order of docs/ARCHITECTURE.md ({marker}); a module may \
         only import modules of lower layers:\n{}",
        breaches
            .iter()
            .map(|b| format!("  {}: {} -> {}", b.file, b.from, b.to))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn the_driver_imports_only_downwards() {
    assert_ordered("src", "<!-- layers:src -->");
}

#[test]
fn the_simulation_imports_only_downwards() {
    assert_ordered("sim/src", "<!-- layers:sim -->");
}

/// The check can fail: an upward import and a circle planted in a scratch crate are found.
#[test]
fn an_upward_import_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::write(src.join("lib.rs"), "pub mod low; pub mod high;").unwrap();
    std::fs::write(
        src.join("low.rs"),
        "//! crate::high in a comment does not count\n\
         use crate::high::Thing;\n\
         #[cfg(test)] mod tests { use crate::high::Other; }\n\
         #[cfg(test)] mod more;",
    )
    .unwrap();
    std::fs::create_dir(src.join("low")).unwrap();
    std::fs::write(src.join("low/more.rs"), "use crate::high::TestOnly;").unwrap();
    std::fs::write(
        src.join("high.rs"),
        "pub struct Thing; fn f() { crate::low::g(); }",
    )
    .unwrap();
    let table: BTreeMap<String, usize> = [("low".to_string(), 0), ("high".to_string(), 1)].into();
    let (breaches, unplaced) = check(src, &table);
    assert!(unplaced.is_empty());
    assert_eq!(
        breaches,
        vec![Breach {
            file: "low.rs".into(),
            from: "low".into(),
            to: "high".into(),
        }]
    );
    // A module the table does not place is reported, not ignored.
    let only_low: BTreeMap<String, usize> = [("low".to_string(), 0)].into();
    let (_, unplaced) = check(src, &only_low);
    assert_eq!(unplaced, BTreeSet::from(["high".to_string()]));
}
