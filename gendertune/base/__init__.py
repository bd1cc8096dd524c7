"""The shared base every layer imports: the stage config base (`config`), the project's error
classes (`errors`), config fields as flags (`flags`), the console's progress lines (`console`) and
the figures several stages draw (`plots`). It imports nothing else of the project."""
