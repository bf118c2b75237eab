"""stub"""


class NonFinite:
    default = False
