//! `/etc/hamal/hamal.conf`: every section and key of the operator's manual, typed, with its
//! defaults and ranges. A bad value is an error naming file, section, key, value and what was
//! expected; an unknown key is a warning; a missing file means the defaults.

mod schema;
mod value;

pub use schema::*;
pub use value::Secret;

use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// Where the config is looked for when neither `--config` nor `HAMAL_CONF` says otherwise.
pub const DEFAULT_PATH: &str = "/etc/hamal/hamal.conf";

/// A loaded configuration and what was noticed while loading it.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub config: Config,
    pub path: PathBuf,
    /// False when the file does not exist and defaults are in force.
    pub found: bool,
    pub warnings: Vec<String>,
}

/// Resolves the config path: explicit argument, then `HAMAL_CONF`, then the default.
pub fn resolve_path(explicit: Option<&Path>) -> PathBuf {
    explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("HAMAL_CONF").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PATH))
}

/// Loads and checks the file at `path`.
pub fn load(path: &Path) -> Result<Loaded> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Loaded {
                config: Config::default(),
                path: path.to_owned(),
                found: false,
                warnings: vec![],
            });
        }
        Err(e) => {
            return Err(Error::Config(format!(
                "{}: cannot read: {e}",
                path.display()
            )))
        }
    };
    let (config, warnings) = parse(&text, &path.display().to_string())?;
    Ok(Loaded {
        config,
        path: path.to_owned(),
        found: true,
        warnings,
    })
}

/// A key set twice in one section (the INI reader would keep one silently): an error naming
/// both lines.
fn check_duplicates(text: &str, origin: &str) -> Result<()> {
    let mut seen = std::collections::HashMap::new();
    let mut section = String::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_owned();
            continue;
        }
        let Some(key) = line.split(['=', ':']).next().map(str::trim) else {
            continue;
        };
        if let Some(first) = seen.insert((section.clone(), key.to_owned()), i + 1) {
            return Err(Error::Config(format!(
                "{origin}: [{section}] {key} is set twice, on lines {first} and {}; keep one",
                i + 1
            )));
        }
    }
    Ok(())
}

/// Parses config text; `origin` names the file in messages.
pub fn parse(text: &str, origin: &str) -> Result<(Config, Vec<String>)> {
    check_duplicates(text, origin)?;
    let ini = ini::Ini::load_from_str_opt(
        text,
        ini::ParseOption {
            enabled_quote: false,
            enabled_escape: false,
            ..Default::default()
        },
    )
    .map_err(|e| Error::Config(format!("{origin}: not a valid INI file: {e}")))?;
    let mut config = Config::default();
    let mut warnings = Vec::new();
    for (section, props) in ini.iter() {
        let Some(section) = section else {
            for (key, _) in props.iter() {
                warnings.push(format!(
                    "{origin}: key '{key}' is outside any section and is ignored"
                ));
            }
            continue;
        };
        if !config.has_section(section) {
            warnings.push(format!("{origin}: unknown section [{section}] is ignored"));
            continue;
        }
        for (key, raw) in props.iter() {
            let value = strip_inline_comment(raw);
            match config.set(section, key, value) {
                Ok(true) => {}
                Ok(false) => warnings.push(format!(
                    "{origin}: unknown key '{key}' in [{section}] is ignored"
                )),
                Err(expected) => {
                    let shown = if config.is_secret(section, key) {
                        "<hidden>".to_string()
                    } else {
                        format!("'{value}'")
                    };
                    return Err(Error::Config(format!(
                        "{origin}: [{section}] {key} = {shown}: expected {expected}"
                    )));
                }
            }
        }
    }
    config
        .check_relations()
        .map_err(|msg| Error::Config(format!("{origin}: {msg}")))?;
    Ok((config, warnings))
}

/// Drops a trailing `# comment` (as in the manual's annotated example) and surrounding quotes.
fn strip_inline_comment(raw: &str) -> &str {
    let v = match raw.find(" #").or_else(|| raw.find("\t#")) {
        Some(i) => &raw[..i],
        None => raw,
    };
    let v = v.trim();
    v.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(v)
}

#[cfg(test)]
mod tests;
