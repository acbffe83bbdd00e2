//! `bhatti setup`: asks for the API endpoint and key, saves them to
//! `~/.bhatti/config.yaml` (mode 0600) and tests the connection.
//!
//! With `--url` and `--token` nothing is asked (for scripts). Prompts show
//! the current values as defaults; the key is read without echo.

use anyhow::{anyhow, bail, Context};
use reqwest::Method;

use crate::config::{ClientConfig, ClientSettings, Resolved, Source, DEFAULT_API_URL};
use crate::model::Sandbox;

use super::client::{ApiClient, Target};
use super::{output, terminal, GlobalArgs};

pub async fn run(global: GlobalArgs) -> anyhow::Result<i32> {
    let path = ClientConfig::default_path()?;
    // A broken file is about to be replaced: only its values are lost.
    let current = match ClientConfig::load(&path) {
        Ok(c) => c.unwrap_or_default(),
        Err(e) => {
            eprintln!("warning: {e}; it will be replaced");
            ClientConfig::default()
        }
    };
    let api_url = match nonempty(global.url.as_deref()) {
        Some(u) => u.to_string(),
        None => {
            let default = current.api_url.as_deref().unwrap_or(DEFAULT_API_URL);
            let answer = terminal::prompt_line(&format!("API endpoint [{default}]: "))?
                .ok_or_else(|| anyhow!("no API endpoint given (pass --url to skip the prompt)"))?;
            if answer.is_empty() {
                default.to_string()
            } else {
                answer
            }
        }
    };
    let api_url = api_url.trim().trim_end_matches('/').to_string();
    let auth_token = match nonempty(global.token.as_deref()) {
        Some(t) => t.to_string(),
        None => {
            let keep = current
                .auth_token
                .as_deref()
                .filter(|t| !t.trim().is_empty());
            let question = if keep.is_some() {
                "API key (input hidden) [keep current]: "
            } else {
                "API key (input hidden): "
            };
            let answer = terminal::prompt_hidden(question)?
                .ok_or_else(|| anyhow!("no API key given (pass --token to skip the prompt)"))?;
            match (answer.is_empty(), keep) {
                (false, _) => answer,
                (true, Some(k)) => k.to_string(),
                (true, None) => bail!("an API key is required; ask your bhatti operator for one"),
            }
        }
    };
    let source = Source::ConfigFile(path.clone());
    // Check the URL before writing it anywhere.
    let client = ApiClient::new(ClientSettings {
        api_url: Resolved {
            value: api_url.clone(),
            source: source.clone(),
        },
        auth_token: Some(Resolved {
            value: auth_token.clone(),
            source,
        }),
    })?;
    let config = ClientConfig {
        api_url: Some(api_url),
        auth_token: Some(auth_token),
    };
    config.save(&path)?;
    output::println(&format!("saved {}", path.display()))?;
    let count = test_connection(&client)
        .await
        .context("connection test failed")?;
    output::println(&format!(
        "connected to {}: the server is up and the key works ({count} sandbox{})",
        client.api_url(),
        if count == 1 { "" } else { "es" }
    ))?;
    Ok(0)
}

/// `GET /health`, then an authenticated `GET /sandboxes`; returns the
/// number of sandboxes the key sees.
pub async fn test_connection(client: &ApiClient) -> anyhow::Result<usize> {
    let health = client.request_unauthenticated(Method::GET, &["health"]);
    client.send(health, Target::None).await?;
    let sandboxes: Vec<Sandbox> = client.get_json(&["sandboxes"], Target::None).await?;
    Ok(sandboxes.len())
}

fn nonempty(s: Option<&str>) -> Option<&str> {
    s.map(str::trim).filter(|s| !s.is_empty())
}
