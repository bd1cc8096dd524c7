"""The one exception type the prep stage raises for bad input; its message tells the user what to do."""

from gendertune.base.errors import UserInputError


class PrepInputError(UserInputError):
    """Input data that the prep stage cannot use: the message names the file and the problem."""
