//! Publish rules: a public URL (`<alias>.<domain>`) for a sandbox port.

use super::{rfc3339, Result, Service, ServiceError};
use crate::model::{PublishRequest, PublishedPort};
use crate::store::{generate_alias, validate_alias, PublishRule, StoreError, User};

/// Generated aliases tried before giving up on a (very unlikely) clash.
const ALIAS_TRIES: usize = 5;

impl Service {
    /// Publishes a port; without an alias, one is generated from the
    /// sandbox name. 409 when the alias is taken or the port published.
    pub async fn publish(
        &self,
        user: &User,
        id: &str,
        req: PublishRequest,
    ) -> Result<PublishedPort> {
        let port = valid_port(req.port)?;
        if let Some(a) = &req.alias {
            validate_alias(a)
                .map_err(|e| ServiceError::Invalid(format!("invalid field `alias`: {e}")))?;
        }
        let rec = self.find(user, id).await?;
        let mut tries = 0;
        loop {
            let alias = match &req.alias {
                Some(a) => a.clone(),
                None => generate_alias(&rec.name),
            };
            let sid = rec.id.clone();
            match self
                .store
                .call(move |s| s.create_publish_rule(&sid, port, &alias))
                .await
            {
                Ok(rule) => {
                    tracing::info!(sandbox = %rec.id, port, alias = %rule.alias, "port published");
                    return Ok(self.published_view(&rule));
                }
                Err(StoreError::Conflict(m))
                    if req.alias.is_none() && m.starts_with("alias") && tries < ALIAS_TRIES =>
                {
                    tries += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub async fn list_published(&self, user: &User, id: &str) -> Result<Vec<PublishedPort>> {
        let rec = self.find(user, id).await?;
        let rules = self
            .store
            .call(move |s| s.list_publish_rules(&rec.id))
            .await?;
        Ok(rules.iter().map(|r| self.published_view(r)).collect())
    }

    /// Removes a published port; its URL fails from the next request on.
    pub async fn unpublish(&self, user: &User, id: &str, port: u16) -> Result<()> {
        let rec = self.find(user, id).await?;
        let sid = rec.id.clone();
        self.store
            .call(move |s| s.delete_publish_rule(&sid, port))
            .await?;
        self.proxy.routes.forget_port(&rec.id, port);
        tracing::info!(sandbox = %rec.id, port, "port unpublished");
        Ok(())
    }

    fn published_view(&self, r: &PublishRule) -> PublishedPort {
        PublishedPort {
            id: r.id,
            sandbox_id: r.sandbox_id.clone(),
            port: r.port,
            alias: r.alias.clone(),
            url: format!("{}://{}.{}", self.url_scheme, r.alias, self.domain),
            created_at: rfc3339(r.created_at),
        }
    }
}

fn valid_port(port: i64) -> Result<u16> {
    match u16::try_from(port) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(ServiceError::Invalid(format!(
            "invalid field `port`: must be 1-65535, got {port}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports() {
        assert_eq!(valid_port(1).ok(), Some(1));
        assert_eq!(valid_port(65535).ok(), Some(65535));
        for bad in [0, -1, 65536, i64::MAX] {
            let e = valid_port(bad).expect_err("invalid");
            assert!(e.to_string().contains("`port`"), "{e}");
        }
    }
}
