"""stub"""


class NonLeafGrad:
    default = False
