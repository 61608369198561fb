//! `tally.toml`: the one configuration file. Layers: defaults, the file, `TALLY_*` environment
//! variables (plus `DATABASE_URL`), then command-line flags.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use tally_aggregator::AggregatorConfig;
use tally_alerts::AlertsConfig;
use tally_api::ServeConfig;
use tally_archive::ArchiveConfig;
use tally_billing::subscriptions::SubscriptionsConfig;
use tally_billing::PlanDefinition;
use tally_core::config::{KafkaConfig, Secret};
use tally_core::{MeterDefinition, Meters};
use tally_credits::CreditsConfig;
use tally_emitter::EmitterConfig;
use tally_sink::{SinkConfig, StripeConfig};

/// The whole configuration. Unknown keys are errors.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct TallyConfig {
    pub(crate) database: DatabaseConfig,
    pub(crate) kafka: KafkaConfig,
    pub(crate) emitter: EmitterConfig,
    pub(crate) aggregator: AggregatorConfig,
    pub(crate) sink: SinkConfig,
    pub(crate) stripe: StripeConfig,
    pub(crate) serve: ServeConfig,
    /// `[[meters]]`: the meters events may report.
    pub(crate) meters: Vec<MeterDefinition>,
    /// `[[plans]]`: what each plan grants (applied with `tally plans apply`).
    pub(crate) plans: Vec<PlanDefinition>,
    /// `[subscriptions]`: the scheduler of tally-managed subscriptions and the fallback plan.
    pub(crate) subscriptions: SubscriptionsConfig,
    /// `[credits]`: the rate card of prepaid credits and the burner.
    pub(crate) credits: CreditsConfig,
    /// `[alerts]`: how alert rules are evaluated and deliveries tried.
    pub(crate) alerts: AlertsConfig,
    /// `[archive]`: where `tally archive` keeps every event, and how it writes them.
    pub(crate) archive: ArchiveConfig,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct DatabaseConfig {
    /// Postgres URL, e.g. `postgres://tally@localhost/tally`. Also read from `DATABASE_URL`.
    /// Shown (`tally config`) with its password replaced by `****`, so that an operator still
    /// sees the user, host and database.
    #[serde(serialize_with = "serialize_url")]
    pub(crate) url: Secret,
}

fn serialize_url<S: serde::Serializer>(url: &Secret, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&tally_db::redact_url(url.expose()))
}

/// Settings given as flags; they win over everything else.
#[derive(Debug, Default)]
pub(crate) struct Overrides {
    pub(crate) kafka_brokers: Option<String>,
    pub(crate) database_url: Option<String>,
}

/// Where the file comes from: `--config`/`TALLY_CONFIG`, else `./tally.toml` if present.
pub(crate) fn load(path: Option<&Path>, overrides: Overrides) -> anyhow::Result<TallyConfig> {
    let path: Option<PathBuf> = match path {
        Some(path) => Some(path.to_owned()),
        None => Some(PathBuf::from("tally.toml")).filter(|p| p.is_file()),
    };
    let text = match &path {
        Some(path) => Some(std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read configuration file {}; pass --config with the path of a readable tally.toml (see tally.example.toml)",
                path.display()
            )
        })?),
        None => None,
    };
    let name = path.as_ref().map(|p| p.display().to_string());
    let file = name.as_deref().zip(text.as_deref());
    let mut config: TallyConfig = tally_core::config::load(
        file,
        std::env::vars(),
        &[
            ("DATABASE_URL", "database.url"),
            ("STRIPE_SECRET_KEY", "stripe.secret_key"),
            ("STRIPE_WEBHOOK_SECRET", "serve.stripe_webhook_secret"),
        ],
    )?;
    if let Some(brokers) = overrides.kafka_brokers {
        config.kafka.brokers = brokers;
    }
    if let Some(url) = overrides.database_url {
        config.database.url = Secret::new(url);
    }
    config.validate()?;
    Ok(config)
}

impl TallyConfig {
    fn validate(&self) -> anyhow::Result<()> {
        Meters::new(&self.meters).map_err(|problem| anyhow::anyhow!("[[meters]]: {problem}"))?;
        let meter_names: Vec<String> = self.meters.iter().map(|m| m.name.clone()).collect();
        tally_billing::plan::validate_plans(&self.plans, &meter_names)
            .map_err(|problem| anyhow::anyhow!("[[plans]]: {problem}"))?;
        self.subscriptions
            .validate(&self.plans)
            .map_err(|problem| anyhow::anyhow!("{problem}"))?;
        self.credits
            .validate(&self.meters)
            .map_err(|problem| anyhow::anyhow!("{problem}"))?;
        for plan in &self.plans {
            for (meter, limit) in &plan.limits {
                let priced = self.credits.rates.iter().any(|rate| &rate.meter == meter);
                if limit.enforcement == tally_billing::Enforcement::Credits && !priced {
                    bail!("plan {:?} enforces credits on meter {meter:?}, which has no rate; add a [[credits.rates]] entry for it", plan.name);
                }
            }
        }
        self.alerts
            .validate()
            .map_err(|problem| anyhow::anyhow!("{problem}"))?;
        self.emitter
            .validate()
            .map_err(|problem| anyhow::anyhow!("{problem}"))?;
        self.aggregator
            .validate()
            .map_err(|problem| anyhow::anyhow!("{problem}"))?;
        self.sink
            .validate()
            .map_err(|problem| anyhow::anyhow!("{problem}"))?;
        self.archive
            .validate()
            .map_err(|problem| anyhow::anyhow!("{problem}"))?;
        if let Some(keep) = self.archive.retention {
            // A late event is archived in its own hour: retention shorter than the horizon
            // would delete it at the next pass.
            let least = self.aggregator.lateness_horizon + std::time::Duration::from_secs(86_400);
            if keep < least {
                bail!(
                    "archive.retention ({}) is shorter than aggregator.lateness_horizon and a day ({}): late events would be deleted as soon as they are archived; keep them longer",
                    tally_core::duration::format(keep),
                    tally_core::duration::format(least)
                );
            }
        }
        self.serve
            .validate()
            .map_err(|problem| anyhow::anyhow!("{problem}"))?;
        if self.kafka.topic.is_empty() {
            bail!("kafka.topic must not be empty; the contract topic is \"usage-events\"");
        }
        Ok(())
    }

    /// `[[meters]]`, or a message that says why a stage cannot run without them.
    pub(crate) fn require_meters(&self) -> anyhow::Result<&[MeterDefinition]> {
        if self.meters.is_empty() {
            bail!("no [[meters]] are defined, so every event would be rejected as unknown_meter; define the meters in tally.toml (see tally.example.toml)");
        }
        Ok(&self.meters)
    }

    /// `kafka.brokers`, or a message that says how to set it.
    pub(crate) fn require_brokers(&self) -> anyhow::Result<&str> {
        if self.kafka.brokers.trim().is_empty() {
            bail!("kafka.brokers is not set; pass --kafka-brokers host:9092, set TALLY_KAFKA_BROKERS, or set brokers under [kafka] in tally.toml");
        }
        Ok(&self.kafka.brokers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_retention_shorter_than_the_lateness_horizon_is_refused() {
        let text = "[archive]\nretention = \"30days\"\n";
        let config: TallyConfig =
            tally_core::config::load(Some(("tally.toml", text)), Vec::new(), &[]).unwrap();
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("late events would be deleted"), "{error}");
        let text = "[archive]\nretention = \"400days\"\n";
        let config: TallyConfig =
            tally_core::config::load(Some(("tally.toml", text)), Vec::new(), &[]).unwrap();
        config.validate().unwrap();
    }

    #[test]
    fn the_example_file_is_valid_and_complete() {
        let text = include_str!("../../../tally.example.toml");
        let config: TallyConfig =
            tally_core::config::load(Some(("tally.example.toml", text)), Vec::new(), &[]).unwrap();
        config.validate().unwrap();
        assert!(config.meters.len() >= 3);
        let plans: Vec<&str> = config.plans.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(plans, ["FREE", "PRO", "ENTERPRISE"]);
        // Every default is spelled out in the example, so the example documents them all.
        let defaults = toml::to_string(&TallyConfig::default()).unwrap();
        for line in defaults
            .lines()
            .filter(|l| l.contains(" = ") && !l.ends_with("= []"))
        {
            let key = line.split(" = ").next().unwrap();
            assert!(
                text.contains(&format!("{key} =")),
                "tally.example.toml lacks `{key}`"
            );
        }
    }
}
