//! `image pull` against a real registry (issue 15): Debian's
//! `docker-registry` on loopback with TLS (a CA made here) and token auth (a
//! small token server here signs ES256 JWTs the registry checks). The test
//! pushes a two-layer image (with a whiteout) through the distribution API,
//! the daemon pulls it as a background task with progress, and a sandbox
//! boots from it.

mod common;
mod tiny_image;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{Api, TestDaemon};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const SERVICE: &str = "bhatti-test-registry";
const ISSUER: &str = "bhatti-test-issuer";

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// CA, server certificate for 127.0.0.1, and the token-signing key and certificate.
fn make_pki(dir: &Path) {
    let ec = ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"];
    for key in ["ca.key", "server.key", "signer.key"] {
        let mut a = vec!["genpkey"];
        a.extend_from_slice(&ec);
        a.extend_from_slice(&["-out", key]);
        openssl(dir, &a);
    }
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=bhatti test CA",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-key",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "signer.key",
            "-out",
            "signer.pem",
            "-days",
            "2",
            "-subj",
            "/CN=token signer",
        ],
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn b64url(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// An ES256 JWT granting everything `scope` asks for.
fn token_for(key: &ring::signature::EcdsaKeyPair, cert_der: &[u8], scope: &str) -> String {
    let rng = ring::rand::SystemRandom::new();
    let access: Vec<Value> = scope
        .split(' ')
        .filter_map(|s| {
            let mut p = s.splitn(3, ':');
            let (kind, name, actions) = (p.next()?, p.next()?, p.next()?);
            Some(json!({"type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}))
        })
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let header = json!({"typ": "JWT", "alg": "ES256",
        "x5c": [base64::engine::general_purpose::STANDARD.encode(cert_der)]});
    let claims = json!({"iss": ISSUER, "sub": "", "aud": SERVICE, "exp": now + 600,
        "nbf": now - 60, "iat": now, "jti": format!("{now}-{}", access.len()), "access": access});
    let signing_input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let sig = key.sign(&rng, signing_input.as_bytes()).expect("sign");
    format!("{signing_input}.{}", b64url(sig.as_ref()))
}

/// Serves `GET /token?scope=…` on loopback (plain HTTP: the realm is loopback).
fn start_token_server(dir: &Path, port: u16) {
    let pem = std::fs::read(dir.join("signer.key")).expect("key");
    let der = pem_body(&pem);
    let rng = ring::rand::SystemRandom::new();
    let key = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &der,
        &rng,
    )
    .expect("signer key");
    let cert = pem_body(&std::fs::read(dir.join("signer.pem")).expect("cert"));
    let state = std::sync::Arc::new((key, cert));
    let app = axum::Router::new().route(
        "/token",
        axum::routing::get(
            move |q: axum::extract::Query<std::collections::HashMap<String, String>>| {
                let state = state.clone();
                async move {
                    let scope = q.get("scope").cloned().unwrap_or_default();
                    axum::Json(json!({"token": token_for(&state.0, &state.1, &scope)}))
                }
            },
        ),
    );
    tokio::spawn(async move {
        let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind token server");
        axum::serve(l, app).await.expect("token server");
    });
}

/// The DER inside the first PEM block.
fn pem_body(pem: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(pem);
    let b64: String = text
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("pem base64")
}

struct Registry(Child);

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_registry(dir: &Path, port: u16, token_port: u16) -> Registry {
    let cfg = format!(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {d}/data\n  delete:\n    enabled: true\n\
         http:\n  addr: 127.0.0.1:{port}\n  tls:\n    certificate: {d}/server.pem\n    key: {d}/server.key\n\
         auth:\n  token:\n    realm: http://127.0.0.1:{token_port}/token\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {d}/signer.pem\n",
        d = dir.display()
    );
    std::fs::write(dir.join("registry.yml"), cfg).expect("config");
    let log = std::fs::File::create(dir.join("registry.log")).expect("log");
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(dir.join("registry.yml"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start docker-registry (apt install docker-registry)");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "registry did not listen: {}",
            std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Registry(child)
}

/// A registry client for the push: answers the token challenge like any client.
struct Pusher {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Pusher {
    async fn send(
        &mut self,
        mk: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> reqwest::Response {
        for _ in 0..2 {
            let mut rb = mk(&self.http);
            if let Some(t) = &self.token {
                rb = rb.bearer_auth(t);
            }
            let r = rb.send().await.expect("registry request");
            if r.status() != StatusCode::UNAUTHORIZED {
                return r;
            }
            let ch = r.headers()["www-authenticate"]
                .to_str()
                .expect("challenge")
                .to_string();
            let field = |k: &str| {
                let start = ch.find(&format!("{k}=\"")).expect("field") + k.len() + 2;
                ch[start..start + ch[start..].find('"').expect("end")].to_string()
            };
            let url = format!(
                "{}?service={}&scope={}",
                field("realm"),
                field("service"),
                field("scope")
            );
            let v: Value = reqwest::get(url)
                .await
                .expect("token")
                .json()
                .await
                .expect("json");
            self.token = Some(v["token"].as_str().expect("token").to_string());
        }
        panic!("still unauthorized");
    }

    async fn push_blob(&mut self, repo: &str, data: &[u8]) -> String {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(data)));
        let base = self.base.clone();
        let r = self
            .send(|c| c.post(format!("{base}/v2/{repo}/blobs/uploads/")))
            .await;
        assert_eq!(r.status(), StatusCode::ACCEPTED, "{:?}", r.text().await);
        let loc = r.headers()["location"]
            .to_str()
            .expect("location")
            .to_string();
        let loc = if loc.starts_with("http") {
            loc
        } else {
            format!("{base}{loc}")
        };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let put = format!("{loc}{sep}digest={digest}");
        let body = data.to_vec();
        let r = self
            .send(|c| {
                c.put(&put)
                    .header("content-type", "application/octet-stream")
                    .body(body.clone())
            })
            .await;
        assert_eq!(r.status(), StatusCode::CREATED, "{:?}", r.text().await);
        digest
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_from_a_registry_with_token_auth() {
    let pki = tempfile::tempdir().expect("tempdir");
    make_pki(pki.path());
    let (port, token_port) = (free_port(), free_port());
    start_token_server(pki.path(), token_port);
    let _registry = start_registry(pki.path(), port, token_port);

    // Push a two-layer image.
    let ca = reqwest::Certificate::from_pem(&std::fs::read(pki.path().join("ca.pem")).expect("ca"))
        .expect("ca pem");
    let mut push = Pusher {
        http: reqwest::Client::builder()
            .add_root_certificate(ca)
            .build()
            .expect("client"),
        base: format!("https://127.0.0.1:{port}"),
        token: None,
    };
    let (layer1, layer2gz) = tiny_image::layers();
    let diff2 = {
        let mut d = flate2::read::GzDecoder::new(layer2gz.as_slice());
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut d, &mut raw).expect("gunzip");
        raw
    };
    let config = json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers",
        "diff_ids": [format!("sha256:{}", hex::encode(Sha256::digest(&layer1))),
                     format!("sha256:{}", hex::encode(Sha256::digest(&diff2)))]}})
    .to_string();
    let cfg_digest = push.push_blob("team/tiny", config.as_bytes()).await;
    let l1 = push.push_blob("team/tiny", &layer1).await;
    let l2 = push.push_blob("team/tiny", &layer2gz).await;
    let manifest = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_digest, "size": config.len()},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": l1, "size": layer1.len()},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": l2, "size": layer2gz.len()}]})
    .to_string();
    let base = push.base.clone();
    let r = push
        .send(|c| {
            c.put(format!("{base}/v2/team/tiny/manifests/v1"))
                .header("content-type", "application/vnd.oci.image.manifest.v1+json")
                .body(manifest.clone())
        })
        .await;
    assert_eq!(r.status(), StatusCode::CREATED, "{:?}", r.text().await);

    // The daemon trusts the test CA (SSL_CERT_FILE, as for any https client of bhatti).
    std::env::set_var("SSL_CERT_FILE", pki.path().join("ca.pem"));
    let d = TestDaemon::start("pull");
    let key = d.create_user("puller", &[]);
    let api = Api::new(&d.url, &key);

    let r = api
        .post("/images/pull", json!({"reference": "Not A Reference"}))
        .await;
    let s = r.status();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or_default()
            .contains("invalid image reference"),
        "{v}"
    );

    let wait = |id: String| {
        let api = api.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let t: Value = api
                    .get(&format!("/tasks/{id}"))
                    .await
                    .json()
                    .await
                    .expect("task");
                if t["state"] != "running" {
                    return t;
                }
                assert!(Instant::now() < deadline, "pull never finished: {t}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    // A tag that does not exist: the task fails and says why.
    let r = api
        .post(
            "/images/pull",
            json!({"reference": format!("127.0.0.1:{port}/team/tiny:nope")}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let t: Value = r.json().await.expect("task");
    let t = wait(t["id"].as_str().expect("id").to_string()).await;
    assert_eq!(t["state"], "failed", "{t}");
    assert!(
        t["error"].as_str().unwrap_or_default().contains("404"),
        "{t}"
    );

    let r = api
        .post(
            "/images/pull",
            json!({"reference": format!("127.0.0.1:{port}/team/tiny:v1")}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let t: Value = r.json().await.expect("task");
    assert_eq!(t["kind"], "pull");
    let t = wait(t["id"].as_str().expect("id").to_string()).await;
    assert_eq!(t["state"], "done", "{t}");
    assert_eq!(
        t["bytes_total"],
        (layer1.len() + layer2gz.len()) as u64,
        "{t}"
    );
    assert_eq!(t["bytes_done"], t["bytes_total"], "{t}");
    assert_eq!(t["image"]["name"], "tiny-v1", "{t}");
    assert_eq!(
        t["image"]["source"],
        format!("pull 127.0.0.1:{port}/team/tiny:v1"),
        "{t}"
    );

    let r = api
        .post("/sandboxes", json!({"name": "pulled", "image": "tiny-v1"}))
        .await;
    assert_eq!(r.status(), StatusCode::CREATED, "{:?}", r.text().await);
    let (code, out, err) = api
        .exec("pulled", &["/bin/sh", "-c", "cat /etc/added; ls /etc"])
        .await;
    assert_eq!(code, 0, "{out} {err}");
    assert!(out.starts_with("layer-two\n"), "{out}");
    assert!(!out.contains("removed-me"), "whiteout not applied: {out}");
}
