//! The container and deployment files: configurations that pass `check-config`, a compose file
//! with the expected services, Kubernetes probes on the right routes, a non-root image with a
//! health check. No Docker engine runs here, so these check what can be checked without one.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

const BIN: &str = env!("CARGO_BIN_EXE_token-broker");

fn read(path: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(path: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn check_config(toml: &str, env: &HashMap<String, String>) {
    let out = run_check_config(toml, env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn run_check_config(toml: &str, env: &HashMap<String, String>) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broker.toml");
    std::fs::write(&file, toml).unwrap();
    Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&file)
        .envs(env)
        .output()
        .unwrap()
}

/// The placeholder the Kubernetes example ships where key hashes go.
const PLACEHOLDER: &str = "REPLACE_WITH_KEY_SHA256_FROM_HASH_KEY";

/// A service's environment map, with YAML merge keys (`<<: *anchor`) applied as compose does.
fn environment(service: &Yaml) -> HashMap<String, String> {
    fn collect(map: &Yaml, into: &mut HashMap<String, String>) {
        for (key, value) in map.as_hash().expect("an environment map") {
            match key.as_str() {
                Some("<<") => collect(value, into),
                Some(key) => {
                    into.insert(
                        key.to_owned(),
                        value.as_str().unwrap_or_default().to_owned(),
                    );
                }
                None => {}
            }
        }
    }
    let mut env = HashMap::new();
    collect(&service["environment"], &mut env);
    env
}

#[test]
fn the_compose_file_runs_an_idp_redis_and_two_healthy_replicas_on_loopback() {
    let doc = &yaml("docker-compose.yml")[0];
    let services = &doc["services"];
    for name in ["idp", "redis", "broker-a", "broker-b"] {
        let service = &services[name];
        assert!(!service.is_badvalue(), "service {name} is missing");
        assert!(
            service["healthcheck"]["test"].as_vec().is_some(),
            "{name} healthcheck"
        );
        for port in service["ports"].as_vec().expect("ports") {
            assert!(port.as_str().unwrap().starts_with("127.0.0.1:"), "{port:?}");
        }
        assert!(service["stop_grace_period"].as_str().is_some());
    }
    for name in ["idp", "broker-a", "broker-b"] {
        let test = services[name]["healthcheck"]["test"].as_vec().unwrap();
        assert_eq!(test[1].as_str(), Some("token-broker"));
        assert_eq!(test[2].as_str(), Some("healthcheck"));
    }
    for name in ["broker-a", "broker-b"] {
        let broker = &services[name];
        for dependency in ["idp", "redis"] {
            assert_eq!(
                broker["depends_on"][dependency]["condition"].as_str(),
                Some("service_healthy"),
                "{name} waits for {dependency}"
            );
        }
        let mount = broker["volumes"][0].as_str().unwrap();
        let source = mount.split(':').next().unwrap().trim_start_matches("./");
        let toml = read(source);
        assert!(
            toml.contains("redis://redis:6379"),
            "replicas share the redis service"
        );
        // The IdP's client secrets and the cache key are the ones the configuration reads.
        check_config(&toml, &environment(broker));
    }
}

#[test]
fn the_kubernetes_example_has_probes_and_a_configuration_that_passes_check_config() {
    let config = &yaml("deploy/kubernetes/configmap.yaml")[0];
    let toml = config["data"]["broker.toml"].as_str().expect("broker.toml");
    let secret = &yaml("deploy/kubernetes/secret.yaml")[0];
    let env: HashMap<String, String> = secret["stringData"]
        .as_hash()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().unwrap().to_owned(),
                v.as_str().unwrap().to_owned(),
            )
        })
        .collect();
    // As shipped it holds no working key: check-config refuses every placeholder.
    let shipped = run_check_config(toml, &env);
    assert!(!shipped.status.success());
    let problems = String::from_utf8_lossy(&shipped.stderr);
    assert_eq!(
        problems.matches("not a SHA-256 in hex").count(),
        2,
        "{problems}"
    );
    // With the hashes `hash-key` prints, it is a valid configuration.
    let hashed = (0..2).fold(toml.to_owned(), |toml, _| {
        let out = Command::new(BIN).arg("hash-key").output().unwrap();
        let printed = String::from_utf8_lossy(&out.stdout).into_owned();
        let hash = printed
            .lines()
            .find_map(|line| line.strip_prefix("key_sha256: "))
            .expect("hash-key prints key_sha256")
            .trim()
            .to_owned();
        toml.replacen(PLACEHOLDER, &hash, 1)
    });
    // The service-account files exist in the pod; here they are made in a directory of their own.
    let pod = tempfile::tempdir().unwrap();
    let ca = rcgen::generate_simple_self_signed(vec!["kubernetes.default.svc".to_owned()]).unwrap();
    std::fs::write(pod.path().join("ca.crt"), ca.cert.pem()).unwrap();
    std::fs::write(pod.path().join("token"), "the broker's own token").unwrap();
    let mounted = hashed
        .replace(
            "/var/run/secrets/kubernetes.io/serviceaccount/",
            &format!("{}/", pod.path().display()),
        )
        .replace("/etc/redis-tls/", &format!("{}/", pod.path().display()));
    // A real cache key where the Secret ships a placeholder.
    let mut env = env;
    env.insert(
        "TOKEN_BROKER_CACHE_KEY".to_owned(),
        "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=".to_owned(),
    );
    check_config(&mounted, &env);

    // The calling pod's projected token is for the broker's audience, and its service account
    // is the subject that the configuration names.
    let calling = yaml("deploy/kubernetes/calling-pod.yaml");
    let caller = calling
        .iter()
        .find(|m| m["kind"].as_str() == Some("Deployment"))
        .expect("a calling Deployment");
    let spec = &caller["spec"]["template"]["spec"];
    let projected = &spec["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"];
    let audience = projected["audience"].as_str().expect("a projected token");
    assert!(
        toml.contains(&format!("audience = \"{audience}\"")),
        "{audience}"
    );
    let subject = format!(
        "system:serviceaccount:{}:{}",
        caller["metadata"]["namespace"].as_str().unwrap(),
        spec["serviceAccountName"].as_str().unwrap()
    );
    assert!(
        toml.contains(&format!("subject = \"{subject}\"")),
        "{subject}"
    );

    let manifests = yaml("deploy/kubernetes/deployment.yaml");
    let deployment = manifests
        .iter()
        .find(|m| m["kind"].as_str() == Some("Deployment"))
        .expect("a Deployment");
    assert_eq!(
        deployment["spec"]["template"]["spec"]["serviceAccountName"].as_str(),
        Some("token-broker"),
        "the broker reads the cluster's JWKS as its own service account"
    );
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        container["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/livez")
    );
    assert_eq!(
        container["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert_eq!(
        container["envFrom"][0]["secretRef"]["name"].as_str(),
        secret["metadata"]["name"].as_str()
    );
    let grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_i64()
        .unwrap();
    assert!(grace > 20, "longer than shutdown_grace");
    assert!(
        manifests
            .iter()
            .any(|m| m["kind"].as_str() == Some("Service"))
    );
}

#[test]
fn the_image_is_multi_stage_non_root_with_an_exec_form_healthcheck_and_entrypoint() {
    let dockerfile = read("Dockerfile");
    let stages = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .count();
    assert_eq!(stages, 2, "a build stage and a runtime stage");
    assert!(dockerfile.contains("ca-certificates"));
    let user = dockerfile
        .lines()
        .find(|l| l.starts_with("USER "))
        .expect("USER");
    assert!(!user.contains("root") && !user.contains(" 0"), "{user}");
    assert!(dockerfile.contains(r#"CMD ["token-broker", "healthcheck""#));
    assert!(dockerfile.contains(r#"ENTRYPOINT ["token-broker"]"#));
    let ignored = read(".dockerignore");
    assert!(ignored.lines().any(|l| l.trim_end_matches('/') == "target"));
    assert!(ignored.lines().any(|l| l.trim_end_matches('/') == ".git"));
}

#[test]
fn the_image_leaves_settings_to_the_configuration_file() {
    // An ENV TOKEN_BROKER__… in the image would silently beat a mounted file's value.
    let dockerfile = read("Dockerfile");
    assert!(
        !dockerfile
            .lines()
            .any(|line| line.trim_start().starts_with("ENV") && line.contains("TOKEN_BROKER__")),
        "{dockerfile}"
    );
    let defaults = token_broker::config::Settings::from_toml(
        "[server]\nlisten = \"127.0.0.1:0\"\n[auth]\nallow_anonymous = true\n",
        &|_| None,
    )
    .unwrap();
    assert_eq!(
        defaults.server.listen, "127.0.0.1:0",
        "a file's listen applies"
    );
    let built_in = token_broker::config::DEFAULT_TOML;
    assert!(
        built_in.contains("listen = \"0.0.0.0:8080\""),
        "the container's port by default"
    );
}
