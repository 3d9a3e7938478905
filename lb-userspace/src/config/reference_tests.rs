//! The config reference in docs/operations.md names every field the config accepts.

/// Every field the config accepts (each `Raw*` struct's fields, which serde takes by name)
/// appears in the reference in docs/operations.md, "Config": as `name =`, a `[table.name]`,
/// or `` `name` `` in its prose.
#[test]
fn the_config_reference_names_every_field() {
    let sources = [
        include_str!("mod.rs"),
        include_str!("vip.rs"),
        include_str!("model.rs"),
        include_str!("health.rs"),
    ];
    let docs = include_str!("../../../docs/operations.md");
    let start = docs.find("\n## Config\n").expect("a Config section");
    let end = docs[start + 1..]
        .find("\n## ")
        .map_or(docs.len(), |i| start + 1 + i);
    let reference = &docs[start..end];
    let mut fields = Vec::new();
    for source in sources {
        let mut rest = source;
        while let Some(at) = rest.find("struct Raw") {
            let body_start = at + rest[at..].find('{').expect("a struct body");
            let body_end = body_start + rest[body_start..].find("\n}").expect("its end");
            for line in rest[body_start + 1..body_end].lines() {
                let line = line.trim();
                if line.starts_with("//") || line.starts_with('#') {
                    continue;
                }
                let line = line.strip_prefix("pub(super) ").unwrap_or(line);
                if let Some((name, _)) = line.split_once(':')
                    && name
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                    && !name.is_empty()
                {
                    fields.push(name.to_owned());
                }
            }
            rest = &rest[body_end..];
        }
    }
    assert!(
        fields.len() > 50,
        "found {} fields: {fields:?}",
        fields.len()
    );
    let missing: Vec<&String> = fields
        .iter()
        .filter(|f| {
            ![
                format!("\n{f} ="),
                format!(" {f} ="),
                format!(".{f}]"),
                format!("[[{f}]]"),
                format!("`{f}`"),
            ]
            .iter()
            .any(|form| reference.contains(form.as_str()))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "not in docs/operations.md's Config reference: {missing:?}"
    );
}
