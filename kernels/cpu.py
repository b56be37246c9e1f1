NAME = "cpu"
def is_available(): return False
def backend(): return None
