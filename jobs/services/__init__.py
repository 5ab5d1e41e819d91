"""Every state change of the jobs app (HackSoft-style services): `<thing>_<verb>(*, ...)`."""
