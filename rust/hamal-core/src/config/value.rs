//! Value types of the config and how each is parsed and shown.

use std::fmt;

/// A secret string (`auth_key`): never shown, not even in Debug output.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "\"\""
        } else {
            "<hidden>"
        })
    }
}

/// A config value: parsed from the INI text, shown back in `hamal config check`.
pub trait ConfigValue: Sized {
    /// Parses `raw`, or says what was expected.
    fn parse(raw: &str) -> Result<Self, String>;
    fn show(&self) -> String;
    const SECRET: bool = false;
}

impl ConfigValue for bool {
    fn parse(raw: &str) -> Result<Self, String> {
        match raw.to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" | "1" => Ok(true),
            "false" | "no" | "off" | "0" => Ok(false),
            _ => Err("a boolean (True or False)".into()),
        }
    }
    fn show(&self) -> String {
        if *self { "True" } else { "False" }.into()
    }
}

impl ConfigValue for u64 {
    fn parse(raw: &str) -> Result<Self, String> {
        raw.parse().map_err(|_| "a whole number".into())
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

impl ConfigValue for String {
    fn parse(raw: &str) -> Result<Self, String> {
        Ok(raw.to_string())
    }
    fn show(&self) -> String {
        self.clone()
    }
}

impl ConfigValue for Secret {
    fn parse(raw: &str) -> Result<Self, String> {
        Ok(Secret(raw.to_string()))
    }
    fn show(&self) -> String {
        if self.0.is_empty() {
            String::new()
        } else {
            "********".into()
        }
    }
    const SECRET: bool = true;
}

/// Checks used in the schema table.
pub mod check {
    pub fn range(lo: u64, hi: u64) -> impl Fn(&u64) -> Result<(), String> {
        move |v| {
            if (lo..=hi).contains(v) {
                Ok(())
            } else {
                Err(format!("a whole number from {lo} to {hi}"))
            }
        }
    }

    pub fn one_of(options: &'static [&'static str]) -> impl Fn(&str) -> Result<(), String> {
        move |v| {
            if options.contains(&v) {
                Ok(())
            } else {
                Err(format!("one of: {}", options.join(", ")))
            }
        }
    }

    pub fn url_or_empty(v: &str) -> Result<(), String> {
        if v.is_empty() || v.starts_with("https://") || v.starts_with("http://") {
            Ok(())
        } else {
            Err("an http:// or https:// URL".into())
        }
    }

    pub fn ip_or_empty(v: &str) -> Result<(), String> {
        if v.is_empty() || v.parse::<std::net::IpAddr>().is_ok() {
            Ok(())
        } else {
            Err("an IP address or empty".into())
        }
    }

    pub fn socket_addr_or_empty(v: &str) -> Result<(), String> {
        if v.is_empty() || v.parse::<std::net::SocketAddr>().is_ok() {
            Ok(())
        } else {
            Err("an address and port such as 127.0.0.1:9787, or empty (off)".into())
        }
    }

    pub fn absolute_path_or_empty(v: &str) -> Result<(), String> {
        if v.is_empty() {
            Ok(())
        } else {
            absolute_path(v)
        }
    }

    /// A comma-separated list of absolute paths, or nothing.
    pub fn absolute_paths_or_empty(v: &str) -> Result<(), String> {
        v.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .try_for_each(absolute_path)
            .map_err(|_| "absolute paths separated by commas, or empty".into())
    }

    pub fn absolute_path(v: &str) -> Result<(), String> {
        if v.starts_with('/') {
            Ok(())
        } else {
            Err("an absolute path".into())
        }
    }
}
