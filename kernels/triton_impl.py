NAME = "triton"
def is_available(): return False
def check_device(d): pass
