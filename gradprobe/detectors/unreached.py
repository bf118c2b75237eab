"""stub"""


class Unreached:
    default = False
