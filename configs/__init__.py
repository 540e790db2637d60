"""cputune's data tables (TOML/CSV). A package only so that they install with cputune."""
