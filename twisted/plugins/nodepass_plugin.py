from twisted.application.service import ServiceMaker

nodepass = ServiceMaker(
    "nodepass",
    "nodepass.tap",
    "A TCP/UDP tunnel daemon: server://, client:// or master:// URL",
    "nodepass",
)
