"""The command line (`gendertune.cli`, the top layer) and what every layer shares: the stage
config base (`gendertune.config`), the project's error classes (`gendertune.errors`) and the
figures several stages draw (`gendertune.plots`). See the README's Layout section."""
