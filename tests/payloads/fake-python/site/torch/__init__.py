__version__ = "2.11.0+stub"


class version:
    cuda = "13.0"


class distributed:
    @staticmethod
    def is_available():
        return True

    @staticmethod
    def is_nccl_available():
        return True


class cuda:
    class nccl:
        @staticmethod
        def version():
            return (2, 28, 3)
