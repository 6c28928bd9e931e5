"""Reading a kohya-ss sd-scripts training setup (command line or TOML) into our run config."""
