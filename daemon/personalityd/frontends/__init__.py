"""Front ends: the D-Bus service and the spool directory; they hand requests to the manager."""
