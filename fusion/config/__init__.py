"""The federation config: a TOML file validated into frozen models (`federation`), the models of
its blocks, and the release parameters derived from it (checked at load).

Public API (what the rest of the repository imports), by module:
- `base`: Frozen, Name (what every block's models share)
- `brokers`: BrokerSource, check_sources, MqttSource, nats_subject_matches, NatsSource
- `federation`: Config, load_config, parse_config; re-exports the blocks' models (FeedConfig, FeedFormat,
  InstitutionConfig, PrivacyMode, PrivacyUnit, StreamSource, ...) where the rest of the repository imports them
- `forecasting`: ForecastingConfig, ModelName, Statistic
- `institutions`: FeedConfig, FeedFormat, InstitutionConfig, TimeFormat
- `mechanisms`: LoadStatistic, MechanismsConfig
- `parameters`: components_per_reading, layout_components, NOISE_MARGIN_SDS, release_parameters, ReleaseParameters
- `privacy`: MetricConfig, PrivacyConfig, PrivacyMode, PrivacyUnit, StatisticsConfig
- `sql_limits`: SqlLimits
- `stream`: duration_or_zero, StreamConfig, StreamSource
- `training`: ModelConfig
"""
