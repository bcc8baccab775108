-- Many medium string.rep calls: each is one instruction, so ~300 of them run between two hook checks.
return { plan = function(ctx)
    while true do
        local s = string.rep('ab', 1 << 20)
    end
end }
