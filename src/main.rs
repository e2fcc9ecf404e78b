//! The `token-broker` command: parse the command line, load configuration, start logging, run.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use token_broker::config::Settings;
use token_broker::startup::{Application, shutdown_signal};
use token_broker::{auth, dev, telemetry};

/// mimalloc: faster than glibc malloc for the many small, short-lived allocations of request
/// handling, and it fragments less next to the long-lived cache entries.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Fetches, caches and serves OAuth2 machine-to-machine tokens for many tenants.
#[derive(Parser)]
#[command(name = "token-broker", version, about)]
struct Cli {
    /// Configuration file, layered over the built-in defaults.
    #[arg(long, global = true, env = "TOKEN_BROKER_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API (what no subcommand does).
    Serve,
    /// Serve with a built-in development IdP and a demo tenant; prints a caller key and a curl
    /// line. `--config` and `TOKEN_BROKER__…` variables are layered over the demo settings.
    Dev {
        /// Address the broker listens on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Lifetime of the development IdP's tokens (short, so a refresh can be watched).
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        token_lifetime: Duration,
    },
    /// Serve only the development IdP (for docker-compose, where several brokers share one IdP).
    DevIdp {
        /// Address the IdP listens on.
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: String,
        /// Lifetime of its tokens.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        token_lifetime: Duration,
        /// The `iss` claim (default: its own URL).
        #[arg(long, default_value = "")]
        issuer: String,
        /// A client it accepts, as ID:SECRET_ENV (the secret is read from that variable); repeatable.
        #[arg(long = "client", value_name = "ID:SECRET_ENV", required = true)]
        clients: Vec<String>,
    },
    /// Validate the configuration and list every problem.
    CheckConfig,
    /// Make a new random caller key and print it with the hash to configure.
    HashKey,
    /// Exit 0 when the broker's /livez answers 200 (for container health checks).
    Healthcheck {
        /// The liveness URL to ask.
        #[arg(long, default_value = "http://127.0.0.1:8080/livez")]
        url: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(cli.config),
        Command::Dev {
            listen,
            token_lifetime,
        } => {
            let _logs = telemetry::init();
            runtime().block_on(async {
                match dev::run(&listen, token_lifetime, cli.config).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        tracing::error!(error = %e, "dev mode failed");
                        eprintln!("error: {e}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
        Command::DevIdp {
            listen,
            token_lifetime,
            issuer,
            clients,
        } => {
            let _logs = telemetry::init();
            runtime().block_on(async {
                match dev::run_idp(&listen, token_lifetime, issuer, &clients).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
        Command::CheckConfig => match Settings::load(cli.config.as_deref()) {
            Ok(settings) => {
                println!("configuration is valid: {}", settings.summary());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::HashKey => {
            let (key, hash) = auth::generate_key();
            println!("key:        {key}");
            println!("key_sha256: {}", hash.to_hex());
            println!();
            println!("Give the key to the calling service (it is not stored anywhere);");
            println!("put key_sha256 in the caller's [callers.NAME] table.");
            ExitCode::SUCCESS
        }
        Command::Healthcheck { url } => healthcheck(&url),
    }
}

fn serve(config: Option<PathBuf>) -> ExitCode {
    let _logs = telemetry::init();
    let settings = match Settings::load(config.as_deref()) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    runtime().block_on(async {
        tracing::info!(summary = %settings.summary(), "starting");
        if settings.auth.allow_anonymous {
            tracing::warn!("auth.allow_anonymous is on: requests without a caller key are served");
        }
        let reloader = Box::new(move || Settings::load(config.as_deref()));
        let app = match Application::build(settings, Some(reloader)).await {
            Ok(app) => app,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(address = %app.local_addr(), "listening");
        match app.run_until_stopped(shutdown_signal()).await {
            Ok(()) => {
                tracing::info!("stopped");
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!(error = %e, "server failed");
                ExitCode::FAILURE
            }
        }
    })
}

fn healthcheck(url: &str) -> ExitCode {
    let check = async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()?;
        client.get(url).send().await
    };
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime")
        .block_on(check)
    {
        Ok(response) if response.status() == reqwest::StatusCode::OK => ExitCode::SUCCESS,
        Ok(response) => {
            eprintln!("unhealthy: {url} answered {}", response.status());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("unhealthy: {url}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}
