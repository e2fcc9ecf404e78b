//! How a problem reading the configuration is told: what went wrong and where (the setting,
//! the file and line, the variable), never the value that could not be read.

use std::path::Path;

use super::ENV_PREFIX;

/// What went wrong reading the layers, without any value or source line: a TOML syntax error
/// names the file, line and column; a wrong type names the setting, what it must be, and where
/// it came from.
pub(super) fn describe(error: &config::ConfigError, file: Option<&Path>) -> String {
    use config::ConfigError as E;
    let origin = |origin: &Option<String>| match origin.as_deref() {
        Some(origin) => format!(" (in {origin})"),
        None => String::new(),
    };
    match error {
        E::FileParse { uri, cause } => {
            // The URI is the file given, made relative to the working directory: name it as given.
            let place = match (uri, file) {
                (Some(_), Some(file)) => file.display().to_string(),
                (Some(uri), None) => uri.clone(),
                (None, _) => "a configuration layer".to_owned(),
            };
            // toml's message starts "TOML parse error at line L, column C", then quotes the line.
            let text = cause.to_string();
            let first = text.lines().next().unwrap_or_default();
            match first.strip_prefix("TOML parse error at ") {
                Some(at) => format!("{place}: TOML syntax error at {at}"),
                None => format!("{place}: not valid TOML"),
            }
        }
        E::Type {
            origin: from,
            expected,
            key,
            ..
        } => format!(
            "{}: must be {expected}{}",
            key.as_deref().unwrap_or("a setting"),
            origin(from)
        ),
        E::At {
            error,
            origin: from,
            key,
        } => match key {
            Some(key) => format!("{key}: {}{}", describe(error, file), origin(from)),
            None => format!("{}{}", describe(error, file), origin(from)),
        },
        E::NotFound(key) => format!("{key}: missing"),
        other => without_quoted_values(&other.to_string()),
    }
}

/// [`describe`] for an error in the table at `at` (its keys are relative to the table).
pub(super) fn describe_at(error: &config::ConfigError, at: &str) -> String {
    use config::ConfigError as E;
    let keyed = matches!(
        error,
        E::At { key: Some(_), .. } | E::Type { key: Some(_), .. }
    );
    if keyed {
        format!("{at}.{}", describe(error, None))
    } else {
        format!("{at}: {}", describe(error, None))
    }
}

/// A reading error's message without the value it could not read. serde and config quote the
/// value (`invalid value: string "…", expected a duration`, `` integer `5` ``, or, for an enum,
/// unquoted after "variant constructor"): every quoted part is replaced by `…`, and backticks
/// are kept only in messages that name fields (`unknown field `x`, expected one of …`). A missing
/// file's name is kept.
pub(super) fn without_quoted_values(text: &str) -> String {
    if text.starts_with("configuration file ") {
        return text.to_owned();
    }
    if text.contains("does not have variant constructor") || text.contains("unknown variant") {
        return "not one of the values this setting takes".to_owned();
    }
    let names_fields = text.starts_with("unknown field") || text.starts_with("missing field");
    let mut out = String::with_capacity(text.len());
    let mut quote = None;
    let mut escaped = false;
    for c in text.chars() {
        match quote {
            Some(open) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == open {
                    out.push(c);
                    quote = None;
                }
            }
            None if c == '"' || (c == '`' && !names_fields) => {
                out.push(c);
                out.push('…');
                quote = Some(c);
            }
            None => out.push(c),
        }
    }
    // An unterminated quote leaves nothing of what followed it.
    if quote.is_some() {
        out.push('…');
    }
    out
}

/// A validation problem with where its setting came from: the environment variable that set
/// it, else the file, else the built-in defaults.
pub(super) fn with_source(problem: String, file: Option<&Path>) -> String {
    let path = problem.split(':').next().unwrap_or_default();
    let variable = format!(
        "{ENV_PREFIX}__{}",
        path.replace('.', "__").to_ascii_uppercase()
    );
    let source = if std::env::var_os(&variable).is_some() {
        format!("environment variable {variable}")
    } else if let Some(file) = file {
        file.display().to_string()
    } else {
        "the built-in defaults".to_owned()
    };
    format!("{problem} (from {source})")
}
