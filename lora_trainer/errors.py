"""The one exception type for problems the user can fix."""


class UserError(Exception):
    """A problem with the user's input (config, files, model) whose message says what to do."""
