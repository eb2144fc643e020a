"""The federation config: a TOML file validated into frozen models (`federation`), the models of
its blocks, and the release parameters derived from it (checked at load).

Public API (what the rest of the repository imports), by module:
- `brokers`: BrokerSource, check_sources, MqttSource, NatsSource
- `federation`: Config, FeedConfig, FeedFormat, InstitutionConfig, load_config, PrivacyMode, PrivacyUnit,
  StreamSource
- `forecasting`: ForecastingConfig, ModelName, Statistic
- `mechanisms`: LoadStatistic, MechanismsConfig
- `parameters`: components_per_reading, layout_components, NOISE_MARGIN_SDS, release_parameters, ReleaseParameters
- `sql_limits`: SqlLimits
- `training`: ModelConfig
"""
