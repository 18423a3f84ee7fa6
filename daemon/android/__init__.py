"""What running on a phone asks of the daemon: Termux's wake lock while jobs run (wakelock.py) and a check of what
a Termux set-up lacks (doctor.py). Off Termux nothing here runs but the doctor's filesystem check."""
