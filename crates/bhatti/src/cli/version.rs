//! `bhatti version`: the CLI's version, the API endpoint in use and whether
//! the server answers.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use super::client::ApiClient;
use super::output;
use super::GlobalArgs;

/// `/health` must answer within this time to count as reachable.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);

pub async fn run(global: GlobalArgs) -> anyhow::Result<i32> {
    let client = ApiClient::from_global(&global)?;
    let version = env!("CARGO_PKG_VERSION");
    let server = health(&client).await;
    if global.json {
        let mut obj = json!({
            "version": version,
            "api_url": client.api_url(),
            "api_url_source": client.api_url_source().to_string(),
        });
        obj["server"] = match &server {
            Ok(h) => {
                let mut s = json!({"status": "ok"});
                if let Some(v) = h.get("version") {
                    s["version"] = v.clone();
                }
                s
            }
            Err(e) => json!({"status": "unreachable", "error": e}),
        };
        output::print_json(&obj)?;
        return Ok(0);
    }
    output::println(&format!("bhatti v{version}"))?;
    output::println(&format!("api: {}", client.api_url()))?;
    let line = match &server {
        Ok(h) => match h.get("version").and_then(Value::as_str) {
            Some(v) => format!("server: v{} (ok)", v.trim_start_matches('v')),
            None => "server: ok".to_string(),
        },
        Err(_) => "server: unreachable".to_string(),
    };
    output::println(&line)?;
    Ok(0)
}

/// `GET /health` as loose JSON (a server version field is shown when present).
async fn health(client: &ApiClient) -> Result<Value, String> {
    let rb = client
        .request_unauthenticated(Method::GET, &["health"])
        .timeout(HEALTH_TIMEOUT);
    let resp = rb.send().await.map_err(|e| super::client::root_cause(&e))?;
    if !resp.status().is_success() {
        return Err(format!("/health answered {}", resp.status()));
    }
    resp.json::<Value>()
        .await
        .map_err(|e| format!("/health did not answer JSON: {e}"))
}
