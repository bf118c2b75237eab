"""stub"""


class InplaceSaved:
    default = False
