"""stub"""


class StaleGrad:
    default = False
