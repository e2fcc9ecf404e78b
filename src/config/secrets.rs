//! Secret resolution: a client secret inline, from an environment variable or from a file,
//! exactly one of them, never repeated in a problem.

use std::path::Path;

use secrecy::{ExposeSecret as _, SecretString};

/// The non-empty value of the environment variable `name` that `setting` names; a problem when
/// it is unset or empty.
pub(super) fn secret_from_env(
    setting: &str,
    name: &str,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<String>,
) -> Option<SecretString> {
    let value = env(name).filter(|value| !value.is_empty());
    if value.is_none() {
        problems.push(format!(
            "{setting}: environment variable {name} is not set or empty"
        ));
    }
    value.map(SecretString::from)
}

/// Resolves exactly one of `client_secret`, `client_secret_env` and `client_secret_file`.
pub(super) fn resolve_secret(
    at: &str,
    inline: Option<SecretString>,
    from_env: Option<&str>,
    from_file: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<String>,
) -> Option<SecretString> {
    let given = [inline.is_some(), from_env.is_some(), from_file.is_some()];
    match given.iter().filter(|g| **g).count() {
        0 => {
            problems.push(format!(
                "{at}: no client secret; set one of client_secret_env, client_secret_file or client_secret"
            ));
            return None;
        }
        1 => {}
        _ => {
            problems.push(format!(
                "{at}: more than one of client_secret, client_secret_env and client_secret_file; keep one"
            ));
            return None;
        }
    }
    let secret = if let Some(secret) = inline {
        secret
    } else if let Some(name) = from_env {
        match env(name) {
            Some(value) => SecretString::from(value),
            None => {
                problems.push(format!(
                    "{at}.client_secret_env: environment variable {name} is not set"
                ));
                return None;
            }
        }
    } else {
        let path = from_file?;
        match std::fs::read_to_string(path) {
            Ok(text) => SecretString::from(text.trim().to_owned()),
            Err(e) => {
                problems.push(format!(
                    "{at}.client_secret_file: cannot read {}: {e}",
                    path.display()
                ));
                return None;
            }
        }
    };
    if secret.expose_secret().trim().is_empty() {
        problems.push(format!("{at}: the client secret is empty"));
        return None;
    }
    Some(secret)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;

    #[test]
    fn secret_file_is_trimmed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secret");
        std::fs::write(&path, "from-file\n").expect("write");
        let toml = format!(
            r#"
            [server]
            listen = "127.0.0.1:8080"
            [auth]
            allow_anonymous = true
            [tenants.acme.environments.staging]
            token_url = "http://127.0.0.1:1/oauth/token"
            client_id = "id"
            client_secret_file = "{}"
            "#,
            path.display()
        );
        let settings = Settings::from_toml(&toml, &no_env).expect("valid");
        let staging = settings.environment("acme", "staging").expect("configured");
        assert_eq!(secret(staging), "from-file");
    }

    #[test]
    fn exactly_one_source_and_never_empty() {
        let base = "[server]\nlisten = \"127.0.0.1:8080\"\n[auth]\nallow_anonymous = true\n[tenants.acme.environments.staging]\ntoken_url = \"http://127.0.0.1:1/t\"\nclient_id = \"id\"\n";
        assert!(problems(base, &no_env).contains("no client secret"));
        let unset = format!("{base}client_secret_env = \"UNSET\"\n");
        assert!(problems(&unset, &no_env).contains("UNSET is not set"));
        let blank = format!("{base}client_secret = \"  \"\n");
        assert!(problems(&blank, &no_env).contains("the client secret is empty"));
    }
}
