//! A strict reader of Prometheus text exposition, for comparing two scrapes regardless of order:
//! which families there are (HELP, TYPE) and which samples (name, labels, value).
//! The swap client's metrics test reads its scrapes with this same file.

use std::collections::BTreeMap;

/// One scrape, order removed. Labels are sorted by name and their values unescaped.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Exposition {
    pub help: BTreeMap<String, String>,
    pub types: BTreeMap<String, String>,
    pub samples: BTreeMap<(String, Vec<(String, String)>), String>,
}

impl Exposition {
    /// Panics on anything it does not understand, so a format change cannot pass unnoticed.
    pub fn parse(text: &str) -> Exposition {
        let mut e = Exposition::default();
        for line in text.lines() {
            if line == "# EOF" {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
                let old = e.help.insert(name.into(), help.into());
                assert!(old.is_none(), "second HELP for {name}");
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
                let old = e.types.insert(name.into(), kind.into());
                assert!(old.is_none(), "second TYPE for {name}");
            } else {
                assert!(!line.starts_with('#'), "unknown comment {line:?}");
                let (key, value) = sample(line);
                assert!(
                    e.types.contains_key(&key.0),
                    "sample before its TYPE: {line:?}"
                );
                let old = e.samples.insert(key, value);
                assert!(old.is_none(), "duplicate sample {line:?}");
            }
        }
        e
    }
}

/// `name{k="v",...} value` or `name value`.
fn sample(line: &str) -> ((String, Vec<(String, String)>), String) {
    let name_end = line.find(['{', ' ']).expect("sample has a value");
    let name = line[..name_end].to_string();
    let mut labels = Vec::new();
    let mut rest = &line[name_end..];
    if let Some(mut r) = rest.strip_prefix('{') {
        loop {
            if let Some(after) = r.strip_prefix('}') {
                r = after;
                break;
            }
            let (key, after) = r.split_once("=\"").expect("label key=\"");
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next().expect("label value is closed") {
                    (_, '\\') => match chars.next().expect("escape has a character").1 {
                        '\\' => value.push('\\'),
                        '"' => value.push('"'),
                        'n' => value.push('\n'),
                        c => panic!("unknown escape \\{c} in {line:?}"),
                    },
                    (i, '"') => break i,
                    (_, c) => value.push(c),
                }
            };
            labels.push((key.to_string(), value));
            r = &after[end + 1..];
            r = r.strip_prefix(',').unwrap_or(r);
        }
        rest = r;
    }
    let value = rest.strip_prefix(' ').expect("one space before the value");
    assert!(
        !value.is_empty() && !value.contains(' '),
        "bad value in {line:?}"
    );
    labels.sort();
    ((name, labels), value.to_string())
}

/// Says precisely what differs, so a failure names the metric.
pub fn assert_same(old: &Exposition, new: &Exposition) {
    for (what, a, b) in [
        ("HELP", &old.help, &new.help),
        ("TYPE", &old.types, &new.types),
    ] {
        for (k, v) in a {
            assert_eq!(b.get(k), Some(v), "{what} of {k}");
        }
        for k in b.keys() {
            assert!(a.contains_key(k), "new {what} {k}");
        }
    }
    for (k, v) in &old.samples {
        assert_eq!(new.samples.get(k), Some(v), "sample {k:?}");
    }
    for k in new.samples.keys() {
        assert!(old.samples.contains_key(k), "new sample {k:?}");
    }
    assert_eq!(old, new);
}
