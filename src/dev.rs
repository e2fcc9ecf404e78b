//! `token-broker dev`: the broker, a built-in development IdP and a demo tenant in one process.
//!
//! The development IdP is also the demo's workload issuer: a workload token for the demo caller
//! is printed too, so a caller without a key can be tried.
//! The demo tenant `demo` has two environments that talk to the development IdP in its two
//! request styles: `production` as Auth0 does (JSON body, credentials in the body) and `staging`
//! as RFC 6749 does (form body, HTTP Basic). A third, `management`, is the Management API client
//! that authorises the rotation of `production`'s secret (an admin key is printed for it). A fresh caller key is made at every start and printed
//! on stdout with a `curl` line that works as printed. The file of `--config` and `TOKEN_BROKER__…`
//! variables are layered over the demo settings (a reload re-reads them), and `cache.min_remaining`
//! is fitted to `--token-lifetime` so a background refresh can be watched.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use tokio::net::TcpListener;

use crate::app::Reloader;
use crate::auth;
use crate::config::{ConfigError, Layer, Settings};
use crate::dev_idp::{DevClient, DevIdp, DevIdpError, DevIdpSettings};
use crate::startup::{Application, StartupError, shutdown_signal};

/// The demo tenant's default audience.
pub const DEMO_AUDIENCE: &str = "https://api.demo.example";

/// The `auth.workload.audience` of dev mode, which the printed workload token carries.
const WORKLOAD_AUDIENCE: &str = "token-broker";

/// The subject of the printed workload token: the demo caller as a Kubernetes service account.
const WORKLOAD_SUBJECT: &str = "system:serviceaccount:demo:app";

/// How long the printed workload token is valid.
const WORKLOAD_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// Why dev mode could not run.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// The development IdP could not start.
    #[error("development IdP: {0}")]
    Idp(#[from] DevIdpError),
    /// A listener could not be bound.
    #[error("cannot listen: {0}")]
    Io(#[from] std::io::Error),
    /// The generated configuration is invalid (a bug) or the listen address is.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// The broker could not start.
    #[error("{0}")]
    Startup(#[from] StartupError),
    /// A `--client` argument is not `ID:SECRET_ENV` or its variable is not set.
    #[error("--client {0}: expected ID:SECRET_ENV with SECRET_ENV set in the environment")]
    Client(String),
}

fn random_secret() -> String {
    auth::generate_key().0
}

/// The most `cache.min_remaining` dev mode uses: the built-in default.
const MAX_MIN_REMAINING: Duration = Duration::from_secs(60);

/// The `cache.min_remaining` that fits tokens of `lifetime`: the default, or a third of the
/// lifetime when that is less, so a token is servable for two thirds of its life and its
/// background refresh can be watched.
pub fn min_remaining_for(lifetime: Duration) -> Duration {
    MAX_MIN_REMAINING.min(lifetime / 3)
}

/// Runs dev mode until Ctrl-C or SIGTERM. `config` (`--config`) and `TOKEN_BROKER__…`
/// variables are layered over the demo settings, and a reload re-reads them.
pub async fn run(
    listen: &str,
    token_lifetime: Duration,
    config: Option<PathBuf>,
) -> Result<(), DevError> {
    let clients = [
        ("demo-production", "DEMO_PRODUCTION_CLIENT_SECRET"),
        ("demo-staging", "DEMO_STAGING_CLIENT_SECRET"),
        ("demo-management", "DEMO_MANAGEMENT_CLIENT_SECRET"),
    ];
    let secrets: HashMap<&str, String> = clients
        .iter()
        .map(|(_, env)| (*env, random_secret()))
        .collect();
    let idp = DevIdp::new(DevIdpSettings {
        issuer: String::new(),
        token_lifetime,
        clients: clients
            .iter()
            .map(|(id, env)| DevClient {
                client_id: (*id).to_owned(),
                client_secret: SecretString::from(secrets[env].clone()),
            })
            .collect(),
    })?;
    let idp = idp.serve(TcpListener::bind("127.0.0.1:0").await?).await?;

    let reloadable = config.is_some();
    let (caller_key, caller_hash) = auth::generate_key();
    let (admin_key, admin_hash) = auth::generate_key();
    // Without a shared cache a rotated secret is kept in a file, so that a reload keeps it.
    let rotated_secret_file = std::env::temp_dir().join(format!(
        "token-broker-dev-{}-production.secret",
        std::process::id()
    ));
    let toml = format!(
        r#"
        [server]
        shutdown_grace = "5s"

        [cache]
        min_remaining = "{min_remaining}"

        [auth]
        admin_key_sha256 = "{admin_hash}"

        [auth.workload]
        audience = "{WORKLOAD_AUDIENCE}"
        [[auth.workload.issuers]]
        issuer = "{issuer}"

        [callers.demo]
        key_sha256 = "{hash}"
        workload = [{{ issuer = "{issuer}", subject = "{WORKLOAD_SUBJECT}" }}]
        allow = ["demo/*"]

        [tenants.demo.environments.production]
        token_url = "{token_url}"
        client_id = "demo-production"
        client_secret_env = "DEMO_PRODUCTION_CLIENT_SECRET"
        audience = "{DEMO_AUDIENCE}"
        authorize_url = "{authorize_url}"
        redirect_uri = "{callback_url}"

        [tenants.demo.environments.production.rotation]
        endpoint = "{idp_url}/api/v2/clients/{{client_id}}/rotate-secret"
        authorized_by = "demo/management"
        secret_file = "{secret_file}"

        [tenants.demo.environments.management]
        token_url = "{token_url}"
        client_id = "demo-management"
        client_secret_env = "DEMO_MANAGEMENT_CLIENT_SECRET"
        audience = "{issuer}api/v2/"

        [tenants.demo.environments.staging]
        token_url = "{token_url}"
        client_id = "demo-staging"
        client_secret_env = "DEMO_STAGING_CLIENT_SECRET"
        audience = "{DEMO_AUDIENCE}"
        request_format = "form"
        client_auth = "basic"
        "#,
        hash = caller_hash.to_hex(),
        admin_hash = admin_hash.to_hex(),
        idp_url = idp.base_url(),
        secret_file = rotated_secret_file.display(),
        issuer = idp.issuer(),
        token_url = idp.token_url(),
        authorize_url = idp.authorize_url(),
        callback_url = idp.callback_url(),
        min_remaining = humantime::format_duration(min_remaining_for(token_lifetime)),
    );
    // The listen address of the command line wins over a file's; variables win over both.
    let listen = format!("[server]\nlisten = \"{listen}\"\n");
    let load = move || {
        let mut layers = vec![Layer::Toml(&toml)];
        layers.extend(config.as_deref().map(Layer::File));
        layers.push(Layer::Toml(&listen));
        let env = |name: &str| {
            secrets
                .get(name)
                .cloned()
                .or_else(|| std::env::var(name).ok())
        };
        Settings::from_layers(&layers, true, &env)
    };
    let settings = load()?;
    let cache = settings.cache.clone();
    let reloader: Option<Reloader> = reloadable.then(|| Box::new(load) as Reloader);
    let app = Application::build(settings, reloader).await?;
    let url = format!("http://{}", reachable(app.local_addr()));
    let workload_token =
        idp.workload_token(WORKLOAD_SUBJECT, WORKLOAD_AUDIENCE, WORKLOAD_TOKEN_LIFETIME)?;
    idp.set_sessions_url(format!("{url}/v1/users/demo/production/sessions"));
    let servable = token_lifetime.saturating_sub(cache.min_remaining);
    let refresh_from = servable.mul_f64(1.0 - cache.refresh_ahead);

    println!("token-broker dev mode");
    println!("  broker:          {url}");
    println!(
        "  development IdP: {} (tokens live {}; keys at {})",
        idp.base_url(),
        humantime::format_duration(token_lifetime),
        idp.jwks_url()
    );
    println!(
        "  cache:           min_remaining {}, so each token is refreshed in the background from {} on",
        humantime::format_duration(cache.min_remaining),
        humantime::format_duration(Duration::from_secs(refresh_from.as_secs()))
    );
    println!("  caller key:      {caller_key} (caller 'demo', allowed demo/*)");
    println!("  admin key:       {admin_key} (for /v1/admin)");
    println!(
        "  workload:        caller 'demo' is also {WORKLOAD_SUBJECT} of issuer {}",
        idp.issuer()
    );
    println!();
    println!("Get a token:");
    println!("  curl -s -H 'Authorization: Bearer {caller_key}' '{url}/v1/tokens/demo/production'");
    println!();
    println!(
        "Get one without a key, with a workload token (the development IdP signed it as a cluster signs a pod's service-account token; valid {}):",
        humantime::format_duration(WORKLOAD_TOKEN_LIFETIME)
    );
    println!(
        "  curl -s -H 'Authorization: Bearer {workload_token}' '{url}/v1/tokens/demo/production'"
    );
    println!();
    println!(
        "Get a user token (authorization-code flow; the development IdP signs in 'dev-user' at once):"
    );
    println!(
        "  curl -s -X POST -H 'Authorization: Bearer {caller_key}' -H 'Content-Type: application/json' -d '{{\"scope\":\"offline_access\"}}' '{url}/v1/users/demo/production/authorize'"
    );
    println!("  then open its authorization_url in a browser: the IdP's /callback page shows the");
    println!("  request that redeems the code for a handle, and GET {url}/v1/users/handles/HANDLE");
    println!(
        "  with the same key gives the user's token, refreshed (with rotation) as it expires."
    );
    println!();
    println!(
        "Rotate demo/production's client secret at the development IdP (the old one stops working at once; tokens keep being served):"
    );
    println!(
        "  curl -s -X POST -H 'Authorization: Bearer {admin_key}' '{url}/v1/admin/tenants/demo/environments/production/rotate-secret'"
    );
    println!();
    println!("Press Ctrl-C to stop.");

    let stopped = app.run_until_stopped(shutdown_signal()).await;
    // The development IdP's secrets die with it: a rotated one is of no use after.
    let _ = std::fs::remove_file(&rotated_secret_file);
    stopped?;
    Ok(())
}

/// Runs the development IdP alone until Ctrl-C or SIGTERM; `clients` are `ID:SECRET_ENV`.
pub async fn run_idp(
    listen: &str,
    token_lifetime: Duration,
    issuer: String,
    clients: &[String],
) -> Result<(), DevError> {
    let clients = clients
        .iter()
        .map(|client| {
            let (id, env) = client
                .split_once(':')
                .ok_or_else(|| DevError::Client(client.clone()))?;
            let secret = std::env::var(env)
                .ok()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| DevError::Client(client.clone()))?;
            Ok(DevClient {
                client_id: id.to_owned(),
                client_secret: SecretString::from(secret),
            })
        })
        .collect::<Result<Vec<_>, DevError>>()?;
    let idp = DevIdp::new(DevIdpSettings {
        issuer,
        token_lifetime,
        clients,
    })?;
    let idp = idp.serve(TcpListener::bind(listen).await?).await?;
    tracing::info!(token_url = %idp.token_url(), "development IdP listening");
    shutdown_signal().await;
    Ok(())
}

/// The address a local `curl` can reach: loopback in place of an unspecified address.
fn reachable(address: SocketAddr) -> SocketAddr {
    if address.ip().is_unspecified() {
        let loopback = if address.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        };
        SocketAddr::new(loopback, address.port())
    } else {
        address
    }
}
