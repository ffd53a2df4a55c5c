"""Built-in device profiles, one YAML file per device (shipped as ``edgetl.profile_data``)."""
