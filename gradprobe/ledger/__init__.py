"""The ledger: what a trace recorded, as data (second layer of the flow, under capture).

``records`` holds the frozen records (backward calls, leaves) and the device-side statistics of each
part; ``stats`` the reductions that fill them; ``ledger`` the store the capture layer writes to from
its hooks. Nothing here installs hooks, walks graphs or renders anything.
"""
